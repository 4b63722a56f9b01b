"""TorchDistCoordinator: rank 0's round clock, one all_gather per round boundary."""

from __future__ import annotations

import logging
import math
from typing import Callable

from p2pswarm.comm.core import Progress, should_advance
from p2pswarm import validate as V
from p2pswarm.comm.torchdist.group import parse_ints
from p2pswarm.comm.torchdist.manager import LOCKSTEP_SETTINGS, TorchDistComm
from p2pswarm.components import Coordinator

log = logging.getLogger(__name__)


class TorchDistCoordinator(Coordinator):
    """The swarm's clock is rank 0's. Each decision is one all_gather of [round, stop wish] from every rank,
    so the same exchange carries the clock and lets any rank's stop request (Ctrl-C, SIGTERM; bound with
    bind_stop) stop every rank after the same round.

    start_round: the swarm starts at the furthest resume point of any rank (a rank never goes back).
    next_round(r): every rank sends the round it finished, and rank 0's round is over by the rule every
    clock shares (comm/core.py should_advance), with all ranks as the quorum and no deadline. In lockstep
    every rank has finished round r when it gets there, so the clock always moves to r + 1; a rank that
    reports another round is out of step, and every rank stops saying so. report_finished needs no message
    of its own: the next_round exchange carries it.
    """

    def __init__(self, comm: TorchDistComm):
        self.group = comm.group
        self.rank, self.world_size = comm.rank, comm.world_size
        self._wants_stop: Callable[[], bool] = lambda: False
        self._stop: Callable[[], None] = lambda: None

    def bind_stop(self, wants_stop: Callable[[], bool], stop: Callable[[], None]) -> None:
        self._wants_stop, self._stop = wants_stop, stop

    def _exchange(self, value: int, desc: str) -> list[int]:
        """Every rank's `value`, by rank; stops this rank (after this round) if any rank wants to stop."""
        rows = self.group.all_gather_ints([value, int(self._wants_stop())], desc)
        for r, row in enumerate(rows):  # a round in [-1, 2**31) and a 0/1 stop wish; every rank sees the same
            try:
                parse_ints(row, "clock header", [(-1, V.INT_MAX), (0, 2)])
            except V.Invalid as e:
                raise self.group.fail(f"rank {self.rank}: rank {r} sent a malformed header in {desc} ({e}); "
                                      "every rank must run the same p2pswarm version") from None
        asked = [r for r, row in enumerate(rows) if row[1]]
        if asked:
            if self.rank == 0:
                log.info("rank(s) %s asked to stop: every rank stops now", ", ".join(map(str, asked)))
            self._stop()
        return [row[0] for row in rows]

    def start_round(self, resume_from: int) -> int:
        resume = self._exchange(resume_from, "the start-round exchange")
        start = max(resume)
        if self.rank == 0 and len(set(resume)) > 1:
            log.info("ranks resume at rounds %s; the swarm starts at round %d", resume, start)
        return start

    def next_round(self, finished: int) -> int:
        done = self._exchange(finished, f"the round clock after round {finished}")
        clock = done[0]  # rank 0's: the swarm's clock
        # Every rank is a trainer that finished round done[r]. All of them are the quorum (a lockstep swarm
        # has no optional member), and there is no deadline (the exchange is a collective: a rank that never
        # comes is a RankFailure, not a late trainer). In lockstep they all finished `clock`; a rank behind
        # it (the round is not over) or ahead of it is out of step.
        ranks = {str(r): Progress(round=d, finished=d) for r, d in enumerate(done)}
        over = should_advance(clock, ranks, quorum=self.world_size, deadline=math.inf, first_done_at=None, now=0.0)
        if not over or max(done) > clock:
            shown = ", ".join(f"rank {r}: {d}" for r, d in enumerate(done))
            raise self.group.fail(f"rank {self.rank}: the ranks are out of step at the round clock (last finished "
                                  f"round: {shown}); they must run the same game with the same settings "
                                  f"({', '.join(LOCKSTEP_SETTINGS)})")
        return clock + 1

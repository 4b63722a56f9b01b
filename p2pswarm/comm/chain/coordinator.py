"""ChainCoordinator: the swarm's round clock is a SwarmCoordinator contract's round."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace

from p2pswarm import events as ev
from p2pswarm import validate as V
from p2pswarm.comm.chain.client import ChainClient, ChainError
from p2pswarm.comm.core import MonotonicClock, Progress, should_advance
from p2pswarm.components import Coordinator
from p2pswarm.identity import Identity

log = logging.getLogger(__name__)

MAX_WINNERS = 3  # peers this node votes for per round
MAX_POLL = 60.0  # the back-off of a clock that does not move (Gensyn's clients go up to 15 min)


# A node's claim of its peer id on the chain, as status() reads it: with a proof that verifies here,
# without one (Gensyn's contract holds none; on ours, peers ignore it), no claim, or not read yet.
PROVEN, UNPROVEN, ABSENT, UNKNOWN = "proven", "unproven", "absent", ""


@dataclass(frozen=True)
class ChainStatus:
    """One reading of the chain for the TUI header. `round` is -1 until a read succeeds; after a failure
    the last reading stands and `error` says why in one line ("" while the chain answers)."""

    flavour: str
    eoa: str
    round: int = -1
    stage: int = 0
    stages: int = 1
    registration: str = UNKNOWN
    error: str = ""


def describe(e: BaseException) -> str:
    """A chain failure in one line: a ChainError says what failed; anything else keeps its class name."""
    line = " ".join((str(e) if isinstance(e, ChainError) else f"{type(e).__name__}: {e}").split())
    return line if len(line) <= 200 else line[:197] + "..."


class ChainCoordinator(Coordinator):
    """Follows, and advances, the round of a SwarmCoordinator contract.

    On construction it registers this node's peer id with its chain key (idempotently: a restarted node
    finds itself registered). start_round(resume) is max(resume, the chain's round). next_round(r) returns
    at once when the chain is already past r (further ahead: the node skipped rounds) or behind r (this
    node resumed ahead of the chain, and paces itself); while the chain stands on r it polls, and once r is
    over by the round rule every clock shares (comm/core.py should_advance: this node finished it and the
    contract's stage deadline, counted from the stage's start, passed in chain time) it sends the advance
    itself: advancement is permissionless, so no keeper is needed, and the first peer to send it wins
    (the others' pre-flights revert StageNotOver or StageAlreadyAdvanced and they read the new round: the
    advance names the round and stage it ends, so a late one cannot end the next). On Gensyn's contract only a
    stage manager may advance: the node then follows. The clock never goes back (MonotonicClock).

    With `submit_rewards`, report_finished(r) submits the node's mean local reward of round r (from its
    round_finished event) once, and its winners (the peers whose groups scored best) when `winners`.
    A chain that fails mid-run never raises into the round: it logs one line per change of state and
    keeps the last reading.
    """

    def __init__(self, client: ChainClient, identity: Identity, *, poll: float = 2.0, submit_rewards: bool = False,
                 winners: bool = False):
        self.client = client
        self.identity = identity
        self.peer_id = identity.peer_id
        self.poll = poll
        self.submit_rewards = submit_rewards
        self.submit_winner_votes = winners
        self.seen = MonotonicClock()
        self._stop = threading.Event()
        self._rewards: dict[int, float] = {}
        self._winners: dict[int, list[str]] = {}
        self._failing = ""
        self._follow_only = False
        self._stage = 0  # of the last round read: advanceFrom names the stage this node saw
        self._status = ChainStatus(flavour=client.flavour, eoa=client.eoa)
        client.register(identity)

    @property
    def clock(self) -> int:
        return self.seen.round

    def on_event(self, event: ev.Event) -> None:
        """An EventBus listener: keeps each finished round's local reward, and the swarm peers whose groups
        scored best as this node re-scored them (its winners), for report_finished."""
        if not self.submit_rewards:
            return
        r = event.data.get("round")
        if not isinstance(r, int):
            return
        if event.kind == ev.ROUND_FINISHED:
            reward = event.data.get("reward_local_mean")
            if isinstance(reward, (int, float)) and math.isfinite(reward):
                self._rewards[r] = float(reward)
        elif event.kind == ev.ROLLOUTS_RECEIVED and isinstance(event.data.get("peer_rewards"), dict):
            scores = {p: v for p, v in event.data["peer_rewards"].items() if isinstance(v, (int, float))}
            best = sorted(scores, key=lambda p: -scores[p])
            self._winners[r] = [p for p in best if scores[p] > 0][:MAX_WINNERS]

    def current(self) -> int:
        """The chain's round, never lower than one seen before; the last reading when the chain fails."""
        try:
            r, self._stage = self.client.round()
            self._ok()
        except Exception as e:  # noqa: BLE001 - an RPC hiccup: the last reading stands
            self._fail(e)
            return max(self.clock, 0)
        return self.seen.see([r])

    def _fail(self, e: BaseException) -> None:
        line = describe(e)
        if line != self._failing:  # one line per change of state, not per poll
            log.warning("chain clock: %s (keeping round %d)", line, max(self.clock, 0))
            self._failing = line

    def _ok(self) -> None:
        if self._failing:
            log.info("chain clock: the chain answers again")
            self._failing = ""

    def start_round(self, resume_from: int) -> int:
        first = max(resume_from, self.current())
        log.info("following the chain's rounds on %s (contract %s): chain round %d, starting at round %d",
                 self.client.where, self.client.address, self.clock, first)
        return first

    def report_finished(self, round: int) -> None:
        if not self.submit_rewards:
            return
        try:
            reward = self._rewards.pop(round, None)
            if reward is not None and self.client.submit_reward(round, 0, reward, self.peer_id):
                log.info("submitted round %d's reward %.3f to the chain", round, reward)
            winners = self._winners.pop(round, None)
            if self.submit_winner_votes and winners:
                self.client.submit_winners(round, winners, self.peer_id)
            self._ok()
        except Exception as e:  # noqa: BLE001 - a failed submission must not stop training
            self._fail(e)

    def over(self, finished: int, chain_time: int, deadline: int | None) -> bool:
        """Whether this node may end round `finished` on the chain: the rule's deadline arm in chain time."""
        if deadline is None or self._follow_only:
            return False
        me = {self.peer_id: Progress(round=finished, finished=finished)}
        return should_advance(finished, me, quorum=2**31, deadline=0.0, first_done_at=deadline, now=chain_time)

    def next_round(self, finished: int) -> int:
        delay = self.poll
        told = False
        while True:
            cur = self.current()
            if cur != finished or self._stop.is_set():
                if cur < finished and not told:
                    log.debug("the chain is at round %d, behind this node's round %d", cur, finished)
                return max(finished + 1, cur)
            try:
                if self.over(finished, self.client.chain_time(), self.client.deadline()):
                    if self.client.advance(at=(finished, self._stage)):
                        log.info("advanced the chain to round %d", finished + 1)
                        delay = self.poll
                        continue
                    if self.client.flavour != "p2pswarm":
                        self._follow_only = True
                self._ok()
            except Exception as e:  # noqa: BLE001 - a failing chain must not stop the node: it keeps polling
                self._fail(e)
            if not told:
                log.debug("waiting for the chain to end round %d", finished)
                told = True
            self._stop.wait(delay)
            delay = min(delay * 1.5, MAX_POLL) if self._failing else self.poll

    def status(self) -> ChainStatus:
        """Reads the chain's round and stage and this node's registration: RPCs, so never from a UI's
        event loop. Never raises: a failing chain keeps the last reading, with the reason in `error`.
        A claim never leaves the contract, so once found it is not read again."""
        last = self._status
        try:
            r, stage = self.client.round()
            stages = last.stages
            if last.round < 0:  # fixed at deployment
                stages = V.integer(self.client.view("stageCount"), "stageCount", 1, 2**16)
            registration = last.registration
            if registration in (UNKNOWN, ABSENT):
                claim = self.client.own_registration(self.peer_id)
                registration = ABSENT if claim is None else PROVEN if claim.proven else UNPROVEN
            now = replace(last, round=r, stage=stage, stages=stages, registration=registration, error="")
        except Exception as e:  # noqa: BLE001 - shown in the header; the clock's own polls log the failure
            now = replace(last, error=describe(e))
        self._status = now
        return now

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()

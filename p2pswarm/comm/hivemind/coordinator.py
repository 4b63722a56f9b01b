"""The round clock, over the swarm's topic.

One peer keeps it (`role=coordinator`: a bootstrap peer started with --coordinator, or the node that starts
a new swarm): it publishes {round, started} on the topic (gossip.py) at every change and every 5 s, and
advances it by the round rule every clock shares (comm/core.py `should_advance`): `quorum_fraction` of the
trainers that play along (they played the last round or this one) finished the round, each saying so in
its heartbeat, or `deadline` seconds after the first one did. It persists the round on disk, so a restarted
keeper resumes where it was, never rewinding.

Every other peer follows clock messages authored by a peer it trusts (its initial peers, or
`coordinator_peer`): it plays max(its next round, the clock), so it joins late by jumping forward
("skipped rounds") and never goes back. Nor does it run away from the others: after finishing round r it
waits while live trainers in good standing (HivemindComm.behind: they delivered valid batches before)
still play r or an earlier round, until they finish it or the clock says r is over (at most `hold`
seconds). A fast peer thus stays on the round of a slower one, or of one that restarted, instead of
drifting rounds away for good; a peer that only claims to play holds nobody up, and the keeper's
round_deadline and quorum fraction bound the rest.
With no keeper, a time clock from config (round = (now - genesis) // round_seconds) serves, and without
that each peer paces itself (holding for the others all the same).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from pathlib import Path

from p2pswarm.comm.core import ROUND_CEILING, MonotonicClock, Pace, Progress, RoundRule
from p2pswarm.comm.hivemind import gossip, records
from p2pswarm.comm.hivemind.manager import HivemindComm
from p2pswarm.components import Coordinator
from p2pswarm.run import atomic_write_text

log = logging.getLogger(__name__)

CLOCK_REFRESH = gossip.CLOCK_REFRESH
CATCH_UP = 10_000  # rounds one keeper poll may advance over (all of them over already)
RESHARD_EVERY = 2 * gossip.MEMBER_TTL  # the least time between two changes of the shard count


def read_round(path: Path | None) -> int | None:
    return read_state(path)[0]


def read_state(path: Path | None) -> tuple[int | None, int]:
    """(round, topic shards) a keeper persisted; (None, 1) when there is nothing valid to resume."""
    try:
        state = json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None, 1
    if not isinstance(state, dict) or type(state.get("round")) is not int or not 0 <= state["round"] < ROUND_CEILING:
        return None, 1
    shards = state.get("shards", 1)
    return state["round"], shards if type(shards) is int and 1 <= shards <= gossip.MAX_SHARDS else 1


def write_round(path: Path, round: int, started: float, shards: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"round": round, "started": started, "shards": shards}))


class RoundKeeper:
    """The keeper's loop, on the node's event loop: advance, persist, publish on the topic."""

    def __init__(self, comm: HivemindComm, state_path: Path | None, *, quorum: int = 0, deadline: float = 300.0,
                 fraction: float = 1.0, poll: float = 0.25, log_rounds: bool = True, shard_size: int = 0):
        self.comm = comm
        self.shard_size = shard_size  # trainers per topic shard aimed at (0: one topic, however many)
        self.shards = 1
        self._resharded = float("-inf")
        self.state_path = state_path
        self.rule = RoundRule(quorum=quorum, deadline=deadline, fraction=fraction)
        self.poll = poll
        self.log_rounds = log_rounds  # a training node that keeps the clock prints round lines already
        saved, shards = read_state(state_path)
        self.round = saved if saved is not None else 0
        self.started = time.time()
        if saved is not None:
            log.info("round clock resumed at round %d (from %s)", self.round, state_path)
        else:
            log.info("round clock starts at round 0")
        if shards > 1 and shard_size > 0:  # a restarted keeper does not move the whole swarm back to one topic
            comm.node.call(comm._follow(shards, True), timeout=30)
            self.shards, self._resharded = shards, time.monotonic()
        self._persist()
        comm.node.call(self._publish(), timeout=30)
        self._stopped = False
        comm.node.spawn(self._loop())

    def _persist(self) -> None:
        if self.state_path is not None:
            write_round(self.state_path, self.round, self.started, self.shards)

    async def _publish(self) -> None:
        await self.comm._publish(gossip.clock(self.round, self.started, self.shards), topic=self.comm.topic)

    def step(self, members: dict[str, records.Member]) -> bool:
        """Advance once if the round rule says the current round is over (the loop calls it again at once,
        so a clock that fell behind the trainers, e.g. while one played alone, catches up in one poll)."""
        trainers = {p: Progress(m.round, m.finished) for p, m in members.items()
                    if m.role == "trainer" and not m.paused and self.comm.in_my_shard(p)}  # its shards: a uniform sample
        if self.round + 1 >= ROUND_CEILING or not self.rule.step(self.round, trainers):
            return False
        done = sum(1 for p in trainers.values() if p.finished >= self.round)
        self.round += 1
        self.started = time.time()
        self._persist()
        log.log(logging.INFO if self.log_rounds else logging.DEBUG,
                "round clock advanced to round %d (%d of %d live trainer(s) finished round %d)",
                self.round, done, len(trainers), self.round - 1)
        return True

    async def _loop(self) -> None:
        last_publish = time.monotonic()
        pace = Pace(CATCH_UP)  # heartbeats are claims: how fast they can move the clock is bounded by time
        while not self._stopped:
            await asyncio.sleep(self.poll)
            try:
                members = await self.comm.fetch_members()
                moved, most = 0, pace.allowance()
                while moved < most and self.step(members):
                    moved += 1
                pace.spend(moved)
                moved += await self._reshard(members)
                if moved or time.monotonic() - last_publish > CLOCK_REFRESH:
                    await self._publish()
                    last_publish = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a daemon hiccup must not stop the clock
                log.warning("round clock: %s: %s", type(e).__name__, e)

    async def _reshard(self, members: dict[str, records.Member]) -> bool:
        """Split the topic into more shards as trainers join (fewer as they leave), at most once per
        RESHARD_EVERY; the keeper listens to the first KEEPER_SHARDS shards (all, in a swarm of up to ~500
        trainers), for its quorum, and counts the swarm from them. Whether the count changed."""
        heard = sum(1 for p, m in members.items() if m.role == "trainer" and self.comm.in_my_shard(p))
        trainers = heard * self.shards // self.comm.listened_shards
        shards = gossip.shards_for(trainers, self.shard_size, self.shards)
        if shards == self.shards or time.monotonic() - self._resharded < RESHARD_EVERY:
            return False
        log.info("%d live trainer(s): the topic goes from %d to %d shard(s) (about %d trainers each at most)",
                 trainers, self.shards, shards, self.shard_size)
        await self.comm._follow(shards, True)
        self.shards, self._resharded = shards, time.monotonic()
        self._persist()
        return True

    def close(self) -> None:
        self._stopped = True


class DHTCoordinator(Coordinator):
    def __init__(self, comm: HivemindComm, *, trusted: set[str], keeper: RoundKeeper | None = None,
                 round_seconds: float = 0.0, genesis: float = 0.0, hold: float = 300.0, poll: float = 0.3):
        self.comm = comm
        self.hold = hold  # the longest wait for peers behind the round this node finished
        self.poll = poll
        self.trusted = set(trusted) | ({comm.peer_id} if keeper else set())
        self.keeper = keeper
        self.round_seconds = round_seconds
        self.genesis = genesis
        self.seen = MonotonicClock()
        self._stop = threading.Event()
        self._warned = False

    @property
    def clock(self) -> int:
        return self.seen.round

    def current(self) -> int | None:
        """The swarm's round: the keeper's clock message (never lower than one seen before), the time clock,
        or None."""
        if self.keeper is not None:
            return self.seen.see([self.keeper.round])
        self.seen.see(self.comm.clock_rounds(self.trusted))
        self.comm.follow_shards(self.comm.book.clock_shards(self.trusted))
        if self.seen.known:
            return self.seen.round
        if self.round_seconds > 0:
            return max(0, math.floor((time.time() - self.genesis) / self.round_seconds))
        if not self._warned:
            log.info("no round coordinator in this swarm: this peer paces its own rounds")
            self._warned = True
        return None

    def start_round(self, resume_from: int) -> int:
        cur = self.current()
        return resume_from if cur is None else max(resume_from, cur)

    def report_finished(self, round: int) -> None:
        self.comm.set_position(finished=round)  # the keeper's quorum reads it from our heartbeat

    def next_round(self, finished: int) -> int:
        cur = self.current()
        if not (self.keeper is None and not self.seen.known and self.round_seconds > 0):  # not on a time clock
            cur = self._hold(finished, cur)
        target = finished + 1 if cur is None else max(finished + 1, cur)
        if self.keeper is None and not self.seen.known and self.round_seconds > 0:
            # The time clock: wait for the round to start (others play it then), never past a stop request.
            start = self.genesis + target * self.round_seconds
            while not self._stop.is_set() and time.time() < start:
                self._stop.wait(min(0.5, start - time.time()))
        return target

    def _hold(self, finished: int, cur: int | None) -> int | None:
        """Wait until no peer in good standing is behind `finished`, the clock is past it, a stop request, or
        `hold` seconds; the clock as last read."""
        t0 = time.monotonic()
        told = False
        held: set[str] = set()
        while not self._stop.is_set() and (cur is None or cur <= finished):
            if not self.comm.behind(finished):  # as last seen: most rounds, nobody is behind
                break
            try:
                self.comm.node.call(self.comm.fetch_members(), timeout=10)
            except Exception as e:  # noqa: BLE001 - the last member view stands
                log.debug("member read failed: %s", e)
            waiting = self.comm.behind(finished)
            held |= waiting
            if not waiting:
                break
            waited = time.monotonic() - t0
            if waited >= self.hold:
                log.info("round %d: still no word from %s after %.0f s; going on", finished,
                         ", ".join(sorted(self.comm.display_name(p) for p in waiting)), waited)
                break
            if waited >= 10 and not told:
                log.info("round %d: waiting for %s to finish it (at most round_deadline)", finished,
                         ", ".join(sorted(self.comm.display_name(p) for p in waiting)))
                told = True
            self._stop.wait(self.poll)
            cur = self.current()
        self.comm.caught_up(held, finished)
        return cur

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self.keeper is not None:
            self.keeper.close()

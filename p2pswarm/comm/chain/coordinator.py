"""ChainCoordinator: the swarm's round clock is a SwarmCoordinator contract's round."""

from __future__ import annotations

import logging
import math
import threading
import time
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
# How far one reading of the chain's round may be ahead of the last accepted one and be adopted at once:
# 1 + (seconds since the chain last confirmed the accepted round + CHAIN_SLACK) / the shortest round the
# contract allows (ours: stageDuration x stageCount; Gensyn's has no duration: MIN_ROUND_SECONDS).
CHAIN_SLACK = 60.0  # seconds: chain time may run ahead of the wall clock (a dev chain mines a burst of blocks)
MIN_ROUND_SECONDS = 1.0
START_READS = 3  # readings start_round takes at most to confirm the first one
BEHIND_WAIT = 120.0  # seconds next_round waits at most while the chain reads below this node's clock
SUSPECT_LOG_EVERY = 600.0  # seconds between two warnings about implausible readings


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

    A reading is data from an RPC endpoint, which may be broken or hostile, and the clock never goes back:
    adopting one bogus high round (2**31 - 1) would be for good. So a reading is adopted at once only when
    it is at most `allowance(t)` rounds ahead of the accepted round, t being the seconds since the chain last
    read that round: the contract itself bounds how fast its round can move (ours: one stage per
    stageDuration seconds of chain time, and chain time follows the wall clock, give or take CHAIN_SLACK;
    Gensyn's: assumed no faster than a round a second). A reading further ahead (and the very first one,
    which has nothing to be measured against) is suspect: not adopted, counted (`suspect_readings`), logged
    once (then at most every SUSPECT_LOG_EVERY), and adopted only when the next reading confirms it (at or
    above it, and itself plausible from it). A node that was offline for many rounds still catches up, one
    reading later: a real jump reads the same twice; a glitch, a lagging replica or a one-off lie does not.
    An endpoint that lies consistently cannot be outvoted by the node it serves (it is the node's only
    view of the chain): point chain_rpc at a node you trust. next_round waits while the chain stands on
    the finished round; while it reads below this node's clock (a stale replica, or a reading adopted
    earlier that the chain never reached) it waits at most BEHIND_WAIT seconds, then the node paces itself
    as a node resumed ahead of the chain does. interrupt() ends any wait, a receipt's included; each RPC is
    bounded by the transport's deadline (comm/chain/rpc.py).

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
        self._lock = threading.Lock()  # the readings of the game thread and of status() (a UI thread)
        self._seen_at = 0.0  # monotonic time the chain last read the accepted round
        self._pending: tuple[int, int, float] | None = None  # a suspect reading: (round, stage, monotonic time)
        self._round_seconds: float | None = None  # the shortest round the contract allows; read when needed
        self._suspect_logged = -math.inf
        self._raw = -1  # the last round read, accepted or not
        self.suspect_readings = 0
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
        """The chain's round, never lower than one seen before; the last reading when the chain fails or
        reads implausibly far ahead (class docstring)."""
        try:
            r, stage = self.client.round()
            self._ok()
        except Exception as e:  # noqa: BLE001 - an RPC hiccup: the last reading stands
            self._fail(e)
            return max(self.clock, 0)
        return max(self._accept(r, stage)[0], 0)

    def round_seconds(self) -> float:
        """The shortest round the contract allows: ours, stageDuration x stageCount; MIN_ROUND_SECONDS when
        the contract has no duration (Gensyn's) or says 0. Read once (retried while the chain fails)."""
        if self._round_seconds is None:
            if self.client.flavour != "p2pswarm":
                self._round_seconds = MIN_ROUND_SECONDS
            else:
                try:
                    duration = V.integer(self.client.view("stageDuration"), "stageDuration", 0, 2**32)
                    stages = V.integer(self.client.view("stageCount"), "stageCount", 1, 2**16)
                except Exception as e:  # noqa: BLE001 - assume the shortest for now, ask again next time
                    log.debug("chain clock: cannot read the round length (%s)", describe(e))
                    return MIN_ROUND_SECONDS
                self._round_seconds = max(MIN_ROUND_SECONDS, float(duration * stages))
        return self._round_seconds

    def allowance(self, elapsed: float) -> int:
        """Rounds an honest chain may move in `elapsed` seconds, as this node can tell (class docstring);
        with the round length read so far (no RPC)."""
        return 1 + int((max(elapsed, 0.0) + CHAIN_SLACK) / (self._round_seconds or MIN_ROUND_SECONDS))

    def _accept(self, r: int, stage: int) -> tuple[int, bool]:
        """Feed one validated reading to the clock: (the clock's round, whether the reading was suspect)."""
        if r > self.seen.round + 1:
            self.round_seconds()  # reads the contract once, outside the lock
        now = time.monotonic()
        with self._lock:
            self._raw = r
            clock = self.seen.round
            if r <= clock:  # the same round, or a stale replica's: nothing to adopt, no suspect to confirm
                if r == clock:
                    self._seen_at, self._stage = now, stage
                self._pending = None
                return clock, False
            if clock >= 0 and r - clock <= 1:
                return self._adopt(r, stage, now), False
            pending, self._pending = self._pending, None
            if clock >= 0 and r - clock <= self.allowance(now - self._seen_at):
                return self._adopt(r, stage, now), False
            if pending is not None and pending[0] <= r <= pending[0] + self.allowance(now - pending[2]):
                if clock >= 0:
                    log.info("chain clock: round %d confirmed by a second reading (from round %d)", r, clock)
                return self._adopt(r, stage, now), False
            self._pending = (r, stage, now)
            if clock < 0:  # the first reading: nothing to measure it against, so it waits for the next one
                return clock, False
            self.suspect_readings += 1
            if now - self._suspect_logged >= SUSPECT_LOG_EVERY:
                self._suspect_logged = now
                log.warning("chain clock: the chain read round %s, %d rounds past round %d (at most %d expected): "
                            "not adopted unless the next reading confirms it (%d implausible reading(s) so far)",
                            V.clip(r, 24), r - clock, clock, self.allowance(now - self._seen_at),
                            self.suspect_readings)
            return clock, True

    def _adopt(self, r: int, stage: int, now: float) -> int:
        self._seen_at, self._stage, self._pending = now, stage, None
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
        for _ in range(START_READS):  # the first reading is confirmed by the next one
            self.current()
            if self.seen.known or self._failing or self._stop.is_set():
                break
        if not self.seen.known and not self._failing:
            log.warning("chain clock: %d readings of the chain's round did not agree (last %s): starting at round "
                        "%d; the clock follows the chain once its readings agree", START_READS, V.clip(self._raw, 24),
                        resume_from)
        first = max(resume_from, self.clock)
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
        behind_since: float | None = None
        while True:
            cur = self.current()
            if cur != finished or self._stop.is_set():
                if cur < finished and not told:
                    log.debug("the chain is at round %d, behind this node's round %d", cur, finished)
                return max(finished + 1, cur)
            if 0 <= self._raw < finished and not self._failing:  # the chain reads below the clock
                behind_since = time.monotonic() if behind_since is None else behind_since
                if time.monotonic() - behind_since >= max(BEHIND_WAIT, 3 * self.round_seconds()):
                    log.warning("chain clock: the chain has read round %d, below this node's round %d, for %.0f s: "
                                "going on without it", self._raw, finished, time.monotonic() - behind_since)
                    return finished + 1
            else:
                behind_since = None
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
            r, suspect = self._accept(*self.client.round())
            if r < 0:  # a first reading: the next one confirms it
                r, suspect = self._accept(*self.client.round())
            if r < 0:
                raise ChainError(f"two readings of the chain's round did not agree (last {V.clip(self._raw, 24)})")
            stage = self._stage
            stages = last.stages
            if last.round < 0:  # fixed at deployment
                stages = V.integer(self.client.view("stageCount"), "stageCount", 1, 2**16)
            registration = last.registration
            if registration in (UNKNOWN, ABSENT):
                claim = self.client.own_registration(self.peer_id)
                registration = ABSENT if claim is None else PROVEN if claim.proven else UNPROVEN
            now = replace(last, round=r, stage=stage, stages=stages, registration=registration,
                          error=f"implausible round {V.clip(self._raw, 24)} read, not adopted" if suspect else "")
        except Exception as e:  # noqa: BLE001 - shown in the header; the clock's own polls log the failure
            now = replace(last, error=describe(e))
        self._status = now
        return now

    def interrupt(self) -> None:
        self._stop.set()
        self.client.stopping.set()  # a wait for a receipt ends too

    def close(self) -> None:
        self.interrupt()

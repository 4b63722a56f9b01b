"""What every transport shares, so that each backend holds only its own I/O.

    SignedTransport   encode + sign, send counters, the Inbox (decode, replay, drop reasons), per-peer
                      accounting, peer rows, the bridge's relay hook, close callbacks
    collect_need      how many valid batches end a collect (the quorum), and `quorum_reached`
    sample_sources    which K announcers a collect pulls from (uniform, peers with a history first)
    should_advance    when a round is over, for every round clock (DHT keeper, Drive coordinator,
                      torch rank 0, and any clock to come); `RoundRule` keeps its one piece of state
    MonotonicClock    a clock reading that never goes back
    PeerLedger        strikes and back-off bans by authenticated peer id

The rules are pure functions of plain values, pinned by table-driven tests (tests/test_rules.py), so
that "enough peers delivered" and "the round is over" each have exactly one definition.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Container, Iterable, Mapping

from p2pswarm import wire
from p2pswarm.bounded import Recent, RecentCounter
from p2pswarm.components import CommunicationManager, PeerInfo
from p2pswarm.identity import Identity, friendly_name
from p2pswarm.types import Group, Task

log = logging.getLogger(__name__)

# Replays are remembered for the rounds a batch can still arrive for (the wire's round window).
REPLAY_ROUNDS = 2
# Distinct origins one bridge may relay per stage, whatever it declares: invented identities cost nothing,
# so without a bound one relaying peer could hand a receiver hundreds of batches a round.
MAX_RELAYED_ORIGINS = 64

Relay = Callable[[int, int, str, bytes], None]  # (round, stage, origin peer id, signed wire bytes)
TaskCheck = Callable[[Task], "Task | None"]  # DataManager.rederive, or a policy around it


# ---- the quorum of a collect ------------------------------------------------------------------------------
def collect_need(*, want_peers: int, live: int, bridged: int = 0, failed: int = 0, sample: int = 0) -> int:
    """Valid batches that end a collect before its deadline.

    `want_peers` (the collect_peers setting) wins when set. Otherwise every peer that is expected to
    publish this round: the `live` peers not already past it (a peer that joined late and skipped the
    round will not publish it), plus the peers a bridge among them relays (`bridged`), minus those whose
    payload already failed this round (`failed`: gone or hostile; they no longer hold the collect up);
    at most `sample` of them when the transport pulls from a sample of K announcers (0: no sample).
    0 means nobody is expected: the transport returns at once (or once its pulls in flight are done).
    """
    if want_peers > 0:
        return want_peers
    n = max(0, live + bridged - failed)
    return min(n, sample) if sample > 0 else n


def quorum_reached(valid: int, *, want_peers: int, live: int, bridged: int = 0, failed: int = 0) -> bool:
    return valid >= collect_need(want_peers=want_peers, live=live, bridged=bridged, failed=failed)


def sample_sources(pool: Iterable[str], k: int, *, good: Container[str], rng: random.Random) -> list[str]:
    """Up to `k` of the peers in `pool`, drawn uniformly, those with a history of valid batches (`good`)
    preferred: fresh identities get the slots the good ones cannot fill, and never fewer than a quarter of
    them (rounded up), so that an honest newcomer can earn a history while a flood of fresh identities (a
    Sybil) takes at most that quarter from a swarm that has good peers. k <= 0: the whole pool, shuffled.

    Drawing from every announcement seen by a cutoff, not the first ones to arrive, is what keeps the
    sample unbiased (the first are the fast peers, with short completions): callers draw once at the
    cutoff, then again only to replace failed pulls or to take in late announcements."""
    pool = sorted(set(pool))
    if k <= 0 or len(pool) <= k:
        rng.shuffle(pool)
        return pool
    known = [p for p in pool if p in good]
    fresh = [p for p in pool if p not in good]
    n_fresh = min(len(fresh), max(math.ceil(k / 4), k - len(known)))
    n_known = min(len(known), k - n_fresh)
    return rng.sample(known, n_known) + rng.sample(fresh, n_fresh)


# ---- the round rule ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """What a live trainer last said about itself: the round it plays and the last round it finished."""

    round: int = -1
    finished: int = -1


def should_advance(clock: int, trainers: Mapping[str, Progress], *, quorum: int, deadline: float,
                   first_done_at: float | None, now: float, fraction: float = 1.0) -> bool:
    """Whether round `clock` is over, given the live trainers' progress (this node's own included).

    Over when a quorum of trainers has finished (trained) it, or `deadline` seconds after the first one
    did. The quorum is `quorum` when set, else `fraction` (rounded up) of the trainers that play along,
    those that played the previous round or this one (their last announcements): one that has not played
    since before the previous round (stuck, or only pretending to train) is not waited for, a newcomer
    catches up by jumping ahead, and with fraction < 1 a few slow peers do not hold a thousand.
    Nobody finished: never over (a swarm of no trainers waits).
    Finishing, not publishing, is what counts: moving on while trainers still collect would make a node
    that joins then skip a round the others are still waiting for.
    """
    done = sum(1 for p in trainers.values() if p.finished >= clock)
    if done == 0:
        return False
    if first_done_at is not None and now - first_done_at >= deadline:
        return True
    active = sum(1 for p in trainers.values() if max(p.round, p.finished) >= clock - 1)
    return done >= max(1, quorum or math.ceil(fraction * active - 1e-9))


class RoundRule:
    """should_advance with the state it needs: when the first trainer finished the round, and which
    trainers held a round up until its deadline.

    A trainer that says it plays a round but never finishes it makes every round wait `deadline` seconds;
    one that did so is not waited for during the next 2**n rounds (n: how often it did), though it still
    counts as done whenever it finishes. An honest straggler loses nothing: the round ended without it
    anyway, and it catches up by jumping ahead.
    """

    def __init__(self, *, quorum: int = 0, deadline: float = 300.0, fraction: float = 1.0):
        self.quorum = quorum
        self.deadline = deadline
        self.fraction = fraction
        self.first_done_at: float | None = None
        self.stalls: Counter[str] = RecentCounter()
        self.excused_until: dict[str, int] = Recent()  # trainer -> first round it is waited for again

    def step(self, clock: int, trainers: Mapping[str, Progress], now: float | None = None) -> bool:
        """True when round `clock` is over; the caller then advances its clock by one."""
        now = time.time() if now is None else now
        waited = {p: t for p, t in trainers.items()
                  if t.finished >= clock or clock >= self.excused_until.get(p, -1)}
        if self.first_done_at is None and any(p.finished >= clock for p in waited.values()):
            self.first_done_at = now
        if not should_advance(clock, waited, quorum=self.quorum, deadline=self.deadline,
                              first_done_at=self.first_done_at, now=now, fraction=self.fraction):
            return False
        if not should_advance(clock, waited, quorum=self.quorum, deadline=self.deadline, first_done_at=None, now=now,
                              fraction=self.fraction):
            # The deadline ended it: remember who it waited for in vain.
            for p, t in waited.items():
                if t.finished < clock and max(t.round, t.finished) >= clock - 1:
                    self.stalls[p] += 1
                    self.excused_until[p] = clock + 1 + 2 ** self.stalls[p]
        self.first_done_at = None
        return True


# No clock goes past this round: rounds travel as int32 (validate.INT_MAX), and a node that reached the end of
# them would be refused by every peer (its heartbeats and batches out of range) and brought back there by its
# own checkpoint. Half the range is more rounds than any swarm plays (68 years at one round a second).
ROUND_CEILING = 2**30
# The fastest rounds a keeper's clock may run at, catching up or pushed by claims it cannot check: 20 a second
# (the embedded policy's rounds take ~0.1 s). Sybils claiming to have finished rounds far ahead move it no
# faster than that, so ROUND_CEILING is years away.
MIN_ROUND_SECONDS = 0.05


class Pace:
    """How many rounds a keeper may advance its clock by now: one per MIN_ROUND_SECONDS since it started or
    last advanced, saved up to `most`. What moves a keeper's clock are claims (a quorum of heartbeats saying
    a round is finished), and identities are free: the pace bounds how fast invented claims can move it."""

    def __init__(self, most: int, clock: Callable[[], float] = time.monotonic):
        self.most, self.clock = most, clock
        self._tokens, self._last = 1.0, clock()

    def allowance(self) -> int:
        now = self.clock()
        self._tokens = min(float(self.most), self._tokens + (now - self._last) / MIN_ROUND_SECONDS)
        self._last = now
        return int(self._tokens)

    def spend(self, rounds: int) -> None:
        self._tokens -= rounds


class MonotonicClock:
    """The swarm's round as read by a follower: never lower than a reading seen before (a stale replica,
    a restarted keeper that lost its state, or a forged low record cannot send a node back), and never a
    reading at or past ROUND_CEILING (not adopted, not remembered: counted in `refused`)."""

    def __init__(self) -> None:
        self.round = -1
        self.refused = 0

    def see(self, readings: Iterable[int]) -> int:
        for r in readings:
            if type(r) is not int or not r < ROUND_CEILING:
                self.refused += 1
                if self.refused == 1:
                    log.warning("round clock: a reading of %r is not a round any swarm plays (at most %d); "
                                "ignored, as are any more such readings", r, ROUND_CEILING - 1)
                continue
            self.round = max(self.round, r)
        return self.round

    @property
    def known(self) -> bool:
        return self.round >= 0


# ---- per-peer strikes and bans -----------------------------------------------------------------------------
# Drop reasons that only a misbehaving (or broken) peer produces. Network trouble (unreachable, timeouts,
# truncated streams, nothing served) and replays (a restarted honest peer republishes) are not offenses.
OFFENSES = frozenset({
    "bad_signature", "malformed", "schema", "bad_version", "wrong_peer", "wrong_swarm", "wrong_slot", "too_large",
    "round_window", "digest_mismatch", "bad_task", "relay_limit", "relay_mismatch", "over_limit", "over_rate",
    "too_many_recipes",
})
# Distinct task generators one batch may make the receiver build to re-derive its tasks (a recipe less its
# index names one; reasoning-gym builds each in ~20 ms). An honest batch needs one per dataset of its preset.
MAX_RECIPES_PER_BATCH = 32


def _recipe_kind(recipe: Any) -> str:
    """What generator a recipe needs: the recipe without the index of its item."""
    if isinstance(recipe, dict):
        recipe = {k: v for k, v in recipe.items() if k != "index"}
    return json.dumps(recipe, sort_keys=True, default=str)[:1024]


class PeerLedger:
    """Strikes and back-off bans, keyed by the authenticated peer id (never by a name a peer gives itself).

    `strikes` offenses (OFFENSES) without a valid batch in between ban a peer for `base` seconds, doubling
    with each further ban up to `cap` (as Petals bans failing servers). A banned peer's announcements,
    payloads and files are ignored (counted as `banned`) and it does not count toward any quorum; when the
    ban ends it starts over with a clean slate of strikes, but its ban count stays, so a peer that keeps
    misbehaving is ignored for longer and longer. Thread-safe enough for its use: each call is a few dict
    operations from the transport's threads.
    """

    def __init__(self, *, strikes: int = 3, base: float = 30.0, cap: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_strikes = strikes
        self.base = base
        self.cap = cap
        self.clock = clock
        # bounded (p2pswarm/bounded.py): a banned identity forgotten is one its owner could replace anyway
        self.strikes: Counter[str] = RecentCounter()
        self.bans: Counter[str] = RecentCounter()
        self.until: dict[str, float] = Recent()
        self.reason: dict[str, str] = Recent()

    def banned(self, peer: str) -> bool:
        until = self.until.get(peer)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self.until[peer]
        self.strikes.pop(peer, None)
        return False

    def offense(self, peer: str, reason: str) -> bool:
        """Count an offense; True if it banned the peer (never with strikes=0)."""
        if reason not in OFFENSES or self.max_strikes <= 0 or self.banned(peer):
            return False
        self.strikes[peer] += 1
        if self.strikes[peer] < self.max_strikes:
            return False
        self.ban(peer, reason)
        return True

    def ban(self, peer: str, reason: str) -> float:
        self.bans[peer] += 1
        seconds = min(self.cap, self.base * 2 ** (self.bans[peer] - 1))
        self.until[peer] = self.clock() + seconds
        self.reason[peer] = reason
        self.strikes.pop(peer, None)
        log.info("ignoring peer %s for %.0f s (%s; ban %d)", peer[-8:], seconds, reason, self.bans[peer])
        return seconds

    def good(self, peer: str) -> None:
        self.strikes.pop(peer, None)

    def banned_now(self) -> list[str]:
        return [p for p in list(self.until) if self.banned(p)]


# ---- the transport core -----------------------------------------------------------------------------------
class SignedTransport(CommunicationManager):
    """The part of a CommunicationManager that does not depend on the medium.

    A backend subclasses it and writes only its I/O: where signed bytes go on publish, and how they are
    found on collect. It calls `encode` to sign a batch and `count_sent` once the bytes are out;
    `begin_collect` / `end_collect` around a collect; `accept` for every payload that arrives (never
    raises: an invalid payload is counted under its sender and None comes back) and `drop` for payloads
    it refused itself (too large, digest mismatch, unreachable...). A backend that can be bridged
    (comm=hybrid) implements `relay` and `live_peers`, and reports `bridged` in its presence record.
    Close callbacks run once, in order, when the transport closes (`run_close_callbacks`).
    """

    def __init__(self, identity: Identity, swarm: str, *, name: str = "", timeout: float = 10.0,
                 want_peers: int = 0, limits: wire.Limits = wire.Limits()):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.name = name or identity.name
        self.timeout = timeout
        self.want_peers = want_peers
        self.limits = limits
        self.inbox = wire.Inbox(swarm, limits)
        self.sent = 0
        self.bytes_sent = 0
        self.relayed = 0
        self.bridged = 0  # set by a bridge: how many peers of the other side it relays
        self.on_accept: Relay | None = None  # a bridge passes on what this side accepted directly
        self.last_collect_seconds = 0.0
        self.collect_seconds_total = 0.0
        # by authenticated peer id; bounded, the least recently active forgotten first
        self.per_peer: dict[str, Counter[str]] = Recent(factory=Counter)
        self.ledger = PeerLedger()
        self._accept_lock = threading.Lock()  # transports accept from several threads (pulls in executors)
        self.names: dict[str, str] = Recent()  # peer id -> display name, of the peers seen last
        # Set by the game loop (check_tasks_with); a transport used on its own, without a game, keeps the
        # sender's tasks as they came.
        self.task_check: TaskCheck | None = None
        self._close_callbacks: list[Callable[[], None]] = []

    # ---- sending ----------------------------------------------------------------------------------------
    def encode(self, round: int, stage: int, groups: list[Group]) -> bytes:
        return wire.encode(wire.RolloutBatch(self.swarm, round, stage, self.peer_id, groups), self.identity)

    def count_sent(self, data: bytes) -> None:
        self.sent += 1
        self.bytes_sent += len(data)

    def relay(self, round: int, stage: int, origin: str, data: bytes) -> None:
        """Pass on another peer's signed batch, bytes untouched (a bridge from the other side)."""
        raise NotImplementedError(f"{type(self).__name__} cannot relay")

    def live_peers(self) -> set[str]:
        """Other live trainers, as this transport knows them (a bridge counts them for the other side)."""
        return {p.peer_id for p in self.peers()}

    # ---- receiving --------------------------------------------------------------------------------------
    def check_tasks_with(self, check: TaskCheck) -> None:
        self.task_check = check

    def set_ban_policy(self, strikes: int, seconds: float) -> None:
        self.ledger.max_strikes, self.ledger.base = strikes, seconds

    def begin_collect(self, round: int) -> float:
        self.inbox.forget_before(round - REPLAY_ROUNDS)
        return time.monotonic()

    def end_collect(self, t0: float) -> None:
        self.last_collect_seconds = time.monotonic() - t0
        self.collect_seconds_total += self.last_collect_seconds

    def accept(self, data: bytes, *, round: int, stage: int, sender: str,
               via: str | None = None) -> wire.RolloutBatch | None:
        """The batch if `data` is a valid batch signed by `sender` for (round, stage), else None.

        `sender` is the peer id the medium authenticated (or the one a file was registered to); `via` the
        peer that served it on the sender's behalf (a bridge's relay). What fails is counted against
        whoever handed it over — the relaying peer when there is one, since a relay can serve bytes the
        origin never signed — and is an offense toward a ban. A banned peer's bytes are not even decoded.

        Each group's task is then replaced by the receiver's own copy (`task_check`): a group whose task
        does not re-derive is dropped (`bad_task`), and a batch left with no group is not a valid batch."""
        with self._accept_lock:
            return self._accept(data, round, stage, sender, via)

    def _accept(self, data: bytes, round: int, stage: int, sender: str, via: str | None) -> wire.RolloutBatch | None:
        culprit = via or sender
        if self.ledger.banned(culprit) or self.ledger.banned(sender):
            self.drop(culprit, "banned")
            return None
        before = Counter(self.inbox.drops)
        batch = self.inbox.accept(data, current_round=round, expect_peer=sender, slot=(round, stage))
        if batch is None:
            for reason, n in (self.inbox.drops - before).items():
                self.per_peer[culprit][f"dropped_{reason}"] += n
                self.ledger.offense(culprit, reason)
            return None
        if batch.groups and self.task_check is not None and self.check_groups(batch, culprit) == 0:
            return None
        stats = self.per_peer[sender]
        stats["batches"] += 1
        stats["groups"] += len(batch.groups)
        stats["bytes"] += len(data)
        if via is not None:
            stats["relayed"] += 1
            self.per_peer[via]["relays"] += 1
        self.ledger.good(culprit)
        return batch

    def check_groups(self, batch: wire.RolloutBatch, culprit: str) -> int:
        """Keep the groups whose task re-derives, each with the receiver's own task; the count kept.

        Re-deriving costs the receiver CPU (and holds the accept lock), so what one batch can ask for is
        bounded: at most MAX_RECIPES_PER_BATCH generators to build (a task of a generator already built is a
        lookup), and checking stops at the first task that does not re-derive: the groups after it are
        dropped with it, unchecked, and counted as bad tasks too (a sender of one forged task is not owed the
        CPU to find out whether the rest are honest). A task sent twice is kept twice here (an honest sampler
        may draw one twice); selection weighs it once."""
        if len({_recipe_kind(g.task.recipe) for g in batch.groups}) > MAX_RECIPES_PER_BATCH:
            self.drop(culprit, "too_many_recipes")
            self.inbox.groups_from[batch.peer] -= len(batch.groups)
            batch.groups = []
            return 0
        kept = []
        for i, g in enumerate(batch.groups):
            try:
                own = self.task_check(g.task)
            except Exception as e:  # noqa: BLE001 - a check must never take a round down
                log.debug("task check of %s's group: %s: %s", batch.peer[-8:], type(e).__name__, e)
                own = None
            if own is None:
                for _ in batch.groups[i:]:
                    self.drop(culprit, "bad_task")
                break
            g.task = own
            kept.append(g)
        self.inbox.groups_from[batch.peer] -= len(batch.groups) - len(kept)
        batch.groups = kept
        return len(kept)

    def drop(self, sender: str, reason: str) -> None:
        """Count something `sender` handed over that was refused (an offense toward a ban if it is one)."""
        self.inbox.drops[reason] += 1
        self.per_peer[sender][f"dropped_{reason}"] += 1
        self.ledger.offense(sender, reason)

    def pass_on(self, round: int, stage: int, batch: wire.RolloutBatch, data: bytes) -> None:
        """Hand a batch accepted directly from its origin to the bridge, if any. Relayed batches are never
        passed on again, so two bridges cannot echo a batch between them."""
        if self.on_accept is None:
            return
        try:
            self.on_accept(round, stage, batch.peer, data)
        except Exception as e:  # noqa: BLE001 - the other side's trouble is not this round's
            log.warning("relaying %s's batch: %s", batch.peer[-8:], e)

    # ---- reporting --------------------------------------------------------------------------------------
    def peer_info(self, peer_id: str, name: str, round: int, last_seen: float) -> PeerInfo:
        self.names[peer_id] = name or self.names.get(peer_id) or friendly_name(peer_id)
        ignored = self.ledger.reason.get(peer_id, "") if self.ledger.banned(peer_id) else ""
        return PeerInfo(peer_id, self.names[peer_id], round, last_seen, self.inbox.groups_from[peer_id], ignored)

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batches_sent": self.sent, "bytes_sent": self.bytes_sent, **self.inbox.counters()}
        out["per_peer"] = self.per_peer_rows()
        out["peers_banned"] = len(self.ledger.banned_now())
        return out

    def display_name(self, peer_id: str) -> str:
        return self.names.get(peer_id) or friendly_name(peer_id)

    def per_peer_rows(self, limit: int = 256) -> dict[str, dict[str, Any]]:
        """Counters by authenticated peer id, of the `limit` peers active last and of the peers banned now
        (at most `limit` of them too): a metrics row a round cannot list every identity ever made up. A name is
        what a peer calls itself (display only): one that claims another's name is shown disambiguated by the
        tail of its peer id, never merged with it."""
        recent = list(self.per_peer.items())[-limit:]
        rows = {p: dict(c) for p, c in recent}
        for p in self.ledger.banned_now()[-limit:] + [p for p in rows if p in self.ledger.bans]:
            row = rows.setdefault(p, {})
            row["bans"] = self.ledger.bans[p]
            if self.ledger.banned(p):
                row["banned"] = self.ledger.reason.get(p, "")
        names = {p: self.display_name(p) for p in rows}
        taken = Counter(names.values())
        for p, row in rows.items():
            row["name"] = names[p] if taken[names[p]] == 1 else f"{names[p]}~{p[-6:]}"
        return rows

    # ---- lifetime ---------------------------------------------------------------------------------------
    def add_close_callback(self, fn: Callable[[], None]) -> None:
        """Run `fn` when this transport closes (after it said goodbye to the swarm)."""
        self._close_callbacks.append(fn)

    def run_close_callbacks(self) -> None:
        callbacks, self._close_callbacks = self._close_callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - closing the rest matters more
                log.warning("while closing: %s: %s", type(e).__name__, e)

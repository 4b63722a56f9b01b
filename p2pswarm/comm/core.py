"""What every transport shares, so that each backend holds only its own I/O.

    SignedTransport   encode + sign, send counters, the Inbox (decode, replay, drop reasons), per-peer
                      accounting, peer rows, the bridge's relay hook, close callbacks
    collect_need      how many valid batches end a collect (the quorum), and `quorum_reached`
    should_advance    when a round is over, for every round clock (DHT keeper, Drive coordinator,
                      torch rank 0, and any clock to come); `RoundRule` keeps its one piece of state
    MonotonicClock    a clock reading that never goes back

The rules are pure functions of plain values, pinned by table-driven tests (tests/test_rules.py), so
that "enough peers delivered" and "the round is over" each have exactly one definition.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from p2pswarm import wire
from p2pswarm.components import CommunicationManager, PeerInfo
from p2pswarm.identity import Identity, friendly_name
from p2pswarm.types import Group, Task

log = logging.getLogger(__name__)

# Replays are remembered for the rounds a batch can still arrive for (the wire's round window).
REPLAY_ROUNDS = 2

Relay = Callable[[int, int, str, bytes], None]  # (round, stage, origin peer id, signed wire bytes)
TaskCheck = Callable[[Task], "Task | None"]  # DataManager.rederive, or a policy around it


# ---- the quorum of a collect ------------------------------------------------------------------------------
def collect_need(*, want_peers: int, live: int, bridged: int = 0, failed: int = 0) -> int:
    """Valid batches that end a collect before its deadline.

    `want_peers` (the collect_peers setting) wins when set. Otherwise every peer that is expected to
    publish this round: the `live` peers not already past it (a peer that joined late and skipped the
    round will not publish it), plus the peers a bridge among them relays (`bridged`), minus those whose
    payload already failed this round (`failed`: gone or hostile; they no longer hold the collect up).
    0 means nobody is expected: the transport returns at once (or once its pulls in flight are done).
    """
    if want_peers > 0:
        return want_peers
    return max(0, live + bridged - failed)


def quorum_reached(valid: int, *, want_peers: int, live: int, bridged: int = 0, failed: int = 0) -> bool:
    return valid >= collect_need(want_peers=want_peers, live=live, bridged=bridged, failed=failed)


# ---- the round rule ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """What a live trainer last said about itself: the round it plays and the last round it finished."""

    round: int = -1
    finished: int = -1


def should_advance(clock: int, trainers: Mapping[str, Progress], *, quorum: int, deadline: float,
                   first_done_at: float | None, now: float) -> bool:
    """Whether round `clock` is over, given the live trainers' progress (this node's own included).

    Over when a quorum of trainers has finished (trained) it, or `deadline` seconds after the first one
    did. The quorum is `quorum` when set, else every trainer that plays along: one that has not played
    since before the previous round (stuck, or only pretending to train) is not waited for, and a
    newcomer catches up by jumping ahead. Nobody finished: never over (a swarm of no trainers waits).
    Finishing, not publishing, is what counts: moving on while trainers still collect would make a node
    that joins then skip a round the others are still waiting for.
    """
    done = sum(1 for p in trainers.values() if p.finished >= clock)
    if done == 0:
        return False
    if first_done_at is not None and now - first_done_at >= deadline:
        return True
    active = sum(1 for p in trainers.values() if max(p.round, p.finished) >= clock - 1)
    return done >= max(1, quorum or active)


class RoundRule:
    """should_advance with the one piece of state it needs: when the first trainer finished the round."""

    def __init__(self, *, quorum: int = 0, deadline: float = 300.0):
        self.quorum = quorum
        self.deadline = deadline
        self.first_done_at: float | None = None

    def step(self, clock: int, trainers: Mapping[str, Progress], now: float | None = None) -> bool:
        """True when round `clock` is over; the caller then advances its clock by one."""
        now = time.time() if now is None else now
        if self.first_done_at is None and any(p.finished >= clock for p in trainers.values()):
            self.first_done_at = now
        if not should_advance(clock, trainers, quorum=self.quorum, deadline=self.deadline,
                              first_done_at=self.first_done_at, now=now):
            return False
        self.first_done_at = None
        return True


class MonotonicClock:
    """The swarm's round as read by a follower: never lower than a reading seen before (a stale replica,
    a restarted keeper that lost its state, or a forged low record cannot send a node back)."""

    def __init__(self) -> None:
        self.round = -1

    def see(self, readings: Iterable[int]) -> int:
        for r in readings:
            self.round = max(self.round, r)
        return self.round

    @property
    def known(self) -> bool:
        return self.round >= 0


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
        self.per_peer: dict[str, Counter[str]] = defaultdict(Counter)  # by authenticated peer id
        self.names: dict[str, str] = {}  # peer id -> display name, of every peer ever seen
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

    def begin_collect(self, round: int) -> float:
        self.inbox.forget_before(round - REPLAY_ROUNDS)
        return time.monotonic()

    def end_collect(self, t0: float) -> None:
        self.last_collect_seconds = time.monotonic() - t0
        self.collect_seconds_total += self.last_collect_seconds

    def accept(self, data: bytes, *, round: int, stage: int, sender: str,
               relayed: bool = False) -> wire.RolloutBatch | None:
        """The batch if `data` is a valid batch signed by `sender` for (round, stage), else None, counted
        under `sender` (the peer id the medium authenticated, or the one its file was registered to).

        Each group's task is then replaced by the receiver's own copy (`task_check`): a group whose task
        does not re-derive is dropped (`bad_task`), and a batch left with no group is not a valid batch."""
        before = Counter(self.inbox.drops)
        batch = self.inbox.accept(data, current_round=round, expect_peer=sender, slot=(round, stage))
        stats = self.per_peer[sender]
        if batch is None:
            for reason, n in (self.inbox.drops - before).items():
                stats[f"dropped_{reason}"] += n
            return None
        if batch.groups and self.task_check is not None and self.check_groups(batch) == 0:
            return None
        stats["batches"] += 1
        stats["groups"] += len(batch.groups)
        stats["bytes"] += len(data)
        if relayed:
            stats["relayed"] += 1
        return batch

    def check_groups(self, batch: wire.RolloutBatch) -> int:
        """Keep the groups whose task re-derives, each with the receiver's own task; the count kept."""
        kept = []
        for g in batch.groups:
            try:
                own = self.task_check(g.task)
            except Exception as e:  # noqa: BLE001 - a check must never take a round down
                log.debug("task check of %s's group: %s: %s", batch.peer[-8:], type(e).__name__, e)
                own = None
            if own is None:
                self.drop(batch.peer, "bad_task")
                continue
            g.task = own
            kept.append(g)
        self.inbox.groups_from[batch.peer] -= len(batch.groups) - len(kept)
        batch.groups = kept
        return len(kept)

    def drop(self, sender: str, reason: str) -> None:
        """Count a payload the transport refused before decoding it."""
        self.inbox.drops[reason] += 1
        self.per_peer[sender][f"dropped_{reason}"] += 1

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
        return PeerInfo(peer_id, self.names[peer_id], round, last_seen, self.inbox.groups_from[peer_id])

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batches_sent": self.sent, "bytes_sent": self.bytes_sent, **self.inbox.counters()}
        out["per_peer"] = self.per_peer_rows()
        return out

    def display_name(self, peer_id: str) -> str:
        return self.names.get(peer_id) or friendly_name(peer_id)

    def per_peer_rows(self) -> dict[str, dict[str, Any]]:
        """Counters by authenticated peer id. A name is what a peer calls itself (display only): one that
        claims another's name is shown disambiguated by the tail of its peer id, never merged with it."""
        rows = {p: dict(c) for p, c in list(self.per_peer.items())}
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

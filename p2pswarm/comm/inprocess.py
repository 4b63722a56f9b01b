"""A swarm inside one process: several agents (threads) exchange signed wire bytes through a hub.

Used for tests, experiments and the demo; it runs exactly the publish/collect/validate path the
network transports run, minus the network.
"""

from __future__ import annotations

import threading
import time

from p2pswarm import wire
from p2pswarm.components import CommunicationManager, Coordinator, PeerInfo
from p2pswarm.identity import Identity, friendly_name
from p2pswarm.types import Group


class InProcessHub:
    def __init__(self, keep_rounds: int = 4):
        self._cv = threading.Condition()
        self._store: dict[tuple[int, int], dict[str, bytes]] = {}
        self._members: dict[str, PeerInfo] = {}
        self.keep_rounds = keep_rounds

    def join(self, peer_id: str, name: str) -> None:
        with self._cv:
            self._members[peer_id] = PeerInfo(peer_id=peer_id, name=name, last_seen=time.time())
            self._cv.notify_all()

    def leave(self, peer_id: str) -> None:
        with self._cv:
            self._members.pop(peer_id, None)
            self._cv.notify_all()

    def members(self) -> list[PeerInfo]:
        with self._cv:
            return list(self._members.values())

    def put(self, round: int, stage: int, peer_id: str, data: bytes) -> None:
        """Raw bytes in, as a network would deliver them (tests also put hostile bytes here)."""
        with self._cv:
            self._store.setdefault((round, stage), {})[peer_id] = data
            if peer_id in self._members:
                self._members[peer_id].round = round
                self._members[peer_id].last_seen = time.time()
            for key in [k for k in self._store if k[0] < round - self.keep_rounds]:
                del self._store[key]
            self._cv.notify_all()

    def others(self, me: str) -> set[str]:
        with self._cv:
            return {m for m in self._members if m != me}

    def wait(self, round: int, stage: int, seen: set[str], deadline: float) -> dict[str, bytes]:
        """Payloads for (round, stage) from senders not in `seen`. Blocks until there is one, the hub
        changes otherwise (a peer joined or left), or the deadline passes."""
        with self._cv:
            new = {p: d for p, d in self._store.get((round, stage), {}).items() if p not in seen}
            if not new:
                self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))
                new = {p: d for p, d in self._store.get((round, stage), {}).items() if p not in seen}
            return new


class InProcessComm(CommunicationManager):
    def __init__(self, hub: InProcessHub, identity: Identity, swarm: str, timeout: float = 10.0, want_peers: int = 0):
        self.hub = hub
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.timeout = timeout
        self.want_peers = want_peers
        self.inbox = wire.Inbox(swarm)
        self.sent = 0
        self.bytes_sent = 0
        self.last_collect_seconds = 0.0
        hub.join(self.peer_id, identity.name)

    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        data = wire.encode(wire.RolloutBatch(self.swarm, round, stage, self.peer_id, groups), self.identity)
        self.hub.put(round, stage, self.peer_id, data)
        self.sent += 1
        self.bytes_sent += len(data)

    def collect(self, round: int, stage: int) -> list[Group]:
        """Valid batches from other members until all of them (or `want_peers`) delivered, or the deadline.
        Invalid bytes are counted and never count toward the quorum."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        self.inbox.forget_before(round - 2)
        seen: set[str] = {self.peer_id}
        valid: set[str] = set()
        groups: list[Group] = []
        while True:
            need = self.want_peers or len(self.hub.others(self.peer_id))
            if len(valid) >= need or time.monotonic() >= deadline:
                break
            for sender, data in self.hub.wait(round, stage, seen, deadline).items():
                seen.add(sender)
                batch = self.inbox.accept(data, current_round=round, expect_peer=sender, slot=(round, stage))
                if batch is None:
                    continue
                valid.add(sender)
                groups.extend(batch.groups)
        self.last_collect_seconds = time.monotonic() - t0
        return groups

    def peers(self) -> list[PeerInfo]:
        out = []
        for m in self.hub.members():
            if m.peer_id != self.peer_id:
                out.append(PeerInfo(m.peer_id, m.name or friendly_name(m.peer_id), m.round, m.last_seen,
                                    self.inbox.groups_from[m.peer_id]))
        return out

    def counters(self) -> dict[str, int]:
        return {"batches_sent": self.sent, "bytes_sent": self.bytes_sent, **self.inbox.counters()}

    def close(self) -> None:
        self.hub.leave(self.peer_id)


class LocalCoordinator(Coordinator):
    """Every node keeps its own clock; round r+1 follows round r."""

    def start_round(self, resume_from: int) -> int:
        return resume_from

    def next_round(self, finished: int) -> int:
        return finished + 1

"""A swarm inside one process: several agents (threads) exchange signed wire bytes through a hub.

Used for tests, experiments and the demo; it runs exactly the publish/collect/validate path the
network transports run, minus the network.
"""

from __future__ import annotations

import threading
import time

from p2pswarm.comm.core import SignedTransport, quorum_reached
from p2pswarm.components import Coordinator, PeerInfo
from p2pswarm.identity import Identity
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


class InProcessComm(SignedTransport):
    def __init__(self, hub: InProcessHub, identity: Identity, swarm: str, timeout: float = 10.0, want_peers: int = 0):
        super().__init__(identity, swarm, timeout=timeout, want_peers=want_peers)
        self.hub = hub
        hub.join(self.peer_id, identity.name)

    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        data = self.encode(round, stage, groups)
        self.hub.put(round, stage, self.peer_id, data)
        self.count_sent(data)

    def collect(self, round: int, stage: int) -> list[Group]:
        """Valid batches from other members until all of them (or `want_peers`) delivered, or the deadline.
        Invalid bytes are counted and never count toward the quorum."""
        t0 = self.begin_collect(round)
        deadline = t0 + self.timeout
        seen: set[str] = {self.peer_id}
        valid: set[str] = set()
        failed: set[str] = set()  # refused this round: they no longer hold the collect up
        groups: list[Group] = []
        while True:
            live = {p for p in self.hub.others(self.peer_id) if not self.ledger.banned(p)}
            if quorum_reached(len(valid), want_peers=self.want_peers, live=len(live), failed=len(failed & live)):
                break
            if time.monotonic() >= deadline:
                break
            for sender, data in self.hub.wait(round, stage, seen, deadline).items():
                seen.add(sender)
                batch = self.accept(data, round=round, stage=stage, sender=sender)
                if batch is None:
                    failed.add(sender)
                else:
                    valid.add(sender)
                    groups.extend(batch.groups)
        self.end_collect(t0)
        return groups

    def peers(self) -> list[PeerInfo]:
        return [self.peer_info(m.peer_id, m.name, m.round, m.last_seen) for m in self.hub.members()
                if m.peer_id != self.peer_id]

    def close(self) -> None:
        self.hub.leave(self.peer_id)
        self.run_close_callbacks()


class LocalCoordinator(Coordinator):
    """Every node keeps its own clock; round r+1 follows round r."""

    def start_round(self, resume_from: int) -> int:
        return resume_from

    def next_round(self, finished: int) -> int:
        return finished + 1

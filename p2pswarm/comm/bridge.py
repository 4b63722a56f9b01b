"""`--comm hybrid`: one node on both the DHT and the shared folder, bridging them.

It publishes its own rollouts to both sides and collects from both at once. Every batch it accepts
directly from one side it passes on, bytes and signature untouched, to the other: as `<node>~<peer id>`
files in the folder, and as relay announcements in the DHT. Receivers check the original signer, so the
bridge can pass batches on but never alter them, and relayed batches are never relayed again (no echo
between two bridges). DHT peers and Drive peers thus learn from each other.
"""

from __future__ import annotations

import threading

from p2pswarm.comm.core import SignedTransport
from p2pswarm.components import CommunicationManager, Coordinator, PeerInfo
from p2pswarm.types import Group


class HybridComm(CommunicationManager):
    """Two bridgeable transports (SignedTransport: relay, on_accept, bridged, live_peers) as one."""

    def __init__(self, dht: SignedTransport, folder: SignedTransport):
        self.dht, self.folder = dht, folder
        self.peer_id = dht.peer_id
        dht.on_accept = lambda r, s, peer, data: folder.relay(r, s, peer, data)
        folder.on_accept = lambda r, s, peer, data: dht.relay(r, s, peer, data)

    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        # Each side's peers wait for the relayed batches too: say how many come through this bridge.
        self.dht.bridged = len(self.folder.live_peers())
        self.folder.bridged = len(self.dht.live_peers())
        self.dht.publish(round, stage, groups)
        self.folder.publish(round, stage, groups)

    def collect(self, round: int, stage: int) -> list[Group]:
        """Both sides at once, each with its own deadline; one copy of each peer's batch."""
        result: dict[str, list[Group]] = {}

        def run(name: str, comm: CommunicationManager) -> None:
            result[name] = comm.collect(round, stage)

        folder = threading.Thread(target=run, args=("folder", self.folder), daemon=True)
        folder.start()
        run("dht", self.dht)
        folder.join()
        seen = {g.peer for g in result.get("dht", [])}
        return result.get("dht", []) + [g for g in result.get("folder", []) if g.peer not in seen]

    def peers(self) -> list[PeerInfo]:
        out = {p.peer_id: p for p in self.folder.peers()}
        out.update({p.peer_id: p for p in self.dht.peers()})
        return list(out.values())

    def counters(self) -> dict:
        return {**{f"drive_{k}": v for k, v in self.folder.counters().items()}, **self.dht.counters()}

    def check_tasks_with(self, check) -> None:
        self.dht.check_tasks_with(check)
        self.folder.check_tasks_with(check)

    def set_ban_policy(self, strikes: int, seconds: float) -> None:
        self.dht.set_ban_policy(strikes, seconds)
        self.folder.set_ban_policy(strikes, seconds)

    def note_exit(self, why: str) -> None:
        self.folder.note_exit(why)
        self.dht.note_exit(why)

    def serve_last_round(self, round: int, stop: threading.Event) -> None:
        self.dht.serve_last_round(round, stop)  # the folder's files stay where they are

    def close(self) -> None:
        self.folder.close()
        self.dht.close()


class FurthestClock(Coordinator):
    """Follows several clocks at once: the furthest round any of them says (never back)."""

    def __init__(self, *clocks: Coordinator):
        self.clocks = clocks

    def start_round(self, resume_from: int) -> int:
        return max(c.start_round(resume_from) for c in self.clocks)

    def report_finished(self, round: int) -> None:
        for c in self.clocks:
            c.report_finished(round)

    def next_round(self, finished: int) -> int:
        return max(c.next_round(finished) for c in self.clocks)

    def close(self) -> None:
        for c in self.clocks:
            c.close()

"""Per-peer strikes and back-off bans (p2pswarm/comm/core.py PeerLedger), and what a transport does with them."""

from __future__ import annotations

from p2pswarm import wire
from p2pswarm.comm.core import PeerLedger
from p2pswarm.comm.inprocess import InProcessComm, InProcessHub
from p2pswarm.identity import Identity


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_three_offenses_ban_for_a_doubling_time_and_good_batches_clear_strikes():
    clock = Clock()
    ledger = PeerLedger(strikes=3, base=30, cap=100, clock=clock)
    assert not ledger.offense("p", "bad_signature") and not ledger.offense("p", "schema")
    ledger.good("p")  # a valid batch in between: strikes start over
    assert not ledger.offense("p", "malformed") and not ledger.offense("p", "malformed")
    assert ledger.offense("p", "malformed")
    assert ledger.banned("p") and ledger.banned_now() == ["p"]
    clock.t = 29.9
    assert ledger.banned("p")
    clock.t = 30
    assert not ledger.banned("p")
    for _ in range(3):
        ledger.offense("p", "digest_mismatch")
    clock.t = 30 + 59.9
    assert ledger.banned("p")  # the second ban lasts twice as long
    clock.t = 30 + 60
    assert not ledger.banned("p")
    for _ in range(3):
        ledger.offense("p", "bad_task")
    clock.t = 90 + 100
    assert not ledger.banned("p")  # the third would be 120 s: capped at 100
    assert ledger.bans["p"] == 3


def test_network_trouble_and_replays_are_not_offenses():
    ledger = PeerLedger(strikes=1)
    for reason in ("unreachable", "pull_timeout", "truncated", "not_served", "replay", "banned"):
        assert not ledger.offense("p", reason)
    assert not ledger.banned("p")


def test_a_banned_peer_is_not_decoded_and_shows_in_the_counters(tmp_path):
    me, bad = Identity.generate(), Identity.generate()
    comm = InProcessComm(InProcessHub(), me, "swarm")
    garbage = b"\x93not a batch"
    for r in range(3):
        assert comm.accept(garbage, round=r, stage=0, sender=bad.peer_id) is None
    assert comm.ledger.banned(bad.peer_id)
    good = wire.encode(wire.RolloutBatch("swarm", 3, 0, bad.peer_id, []), bad)
    assert comm.accept(good, round=3, stage=0, sender=bad.peer_id) is None  # even a valid one, while banned
    c = comm.counters()
    assert c["peers_banned"] == 1 and c["dropped_banned"] == 1
    row = c["per_peer"][bad.peer_id]
    assert row["dropped_malformed"] == 3 and row["bans"] == 1 and row["banned"] == "malformed"


def test_a_relays_bad_bytes_count_against_the_relay_not_the_origin():
    me, origin, relay = Identity.generate(), Identity.generate(), Identity.generate()
    comm = InProcessComm(InProcessHub(), me, "swarm")
    forged = wire.encode(wire.RolloutBatch("swarm", 0, 0, relay.peer_id, []), relay)  # not the origin's
    assert comm.accept(forged, round=0, stage=0, sender=origin.peer_id, via=relay.peer_id) is None
    rows = comm.counters()["per_peer"]
    assert rows[relay.peer_id]["dropped_wrong_peer"] == 1
    assert origin.peer_id not in rows
    honest = wire.encode(wire.RolloutBatch("swarm", 0, 0, origin.peer_id, []), origin)
    assert comm.accept(honest, round=0, stage=0, sender=origin.peer_id, via=relay.peer_id) is not None
    rows = comm.counters()["per_peer"]
    assert rows[origin.peer_id]["relayed"] == 1 and rows[relay.peer_id]["relays"] == 1


def test_p2pswarm_status_shows_who_a_node_ignores(tmp_path):
    """A Drive node that bans a peer says so in its signed heartbeat; `p2pswarm status` counts it per peer."""
    from p2pswarm.analysis import format_status, get_experiment_status
    from p2pswarm.comm.drive.manager import FolderComm

    url = str(tmp_path / "drive")
    alice = FolderComm(url, Identity.generate(), "exp", name="alice", timeout=0.5, poll=0.02, peer_timeout=30)
    mallory = FolderComm(url, Identity.generate(), "exp", name="mallory", timeout=0.5, poll=0.02, peer_timeout=30)
    try:
        for r in range(3):  # garbage as mallory's batch of three rounds: three strikes
            mallory.store.write_atomic(mallory.store.rollout_path(r, 0, "mallory"), b"\x93garbage")
            assert alice.collect(r, 0) == []
        assert alice.ledger.banned(mallory.peer_id)
        alice.heartbeat()
        st = get_experiment_status(url, "exp")
        rows = {p["node"]: p for p in st["peers"]}
        assert rows["mallory"]["ignored_by"] == ["alice"] and rows["alice"]["ignored_by"] == []
        table = format_status(st)
        assert "ignored by" in table
        assert [line.split()[-1] for line in table.splitlines() if line.startswith("mallory")] == ["1"]
    finally:
        alice.close()
        mallory.close()


def test_one_peer_cannot_pull_the_same_payload_over_and_over():
    import asyncio
    from types import SimpleNamespace

    import msgpack

    from p2pswarm.comm.hivemind.payloads import MAX_PULLS, PayloadServer

    class Writer:
        def __init__(self):
            self.out = b""

        def write(self, b):
            self.out += b

        async def drain(self):
            pass

        def close(self):
            pass

    server = PayloadServer()
    server.put(3, 0, b"x" * 1000)
    greedy, other = SimpleNamespace(peer_id="12D3KooWgreedy"), SimpleNamespace(peer_id="12D3KooWother")

    async def pull(info) -> int:
        reader = asyncio.StreamReader()
        req = msgpack.packb([3, 0])
        reader.feed_data(len(req).to_bytes(8, "big") + req)
        reader.feed_eof()
        w = Writer()
        await server.handle(info, reader, w)
        return int.from_bytes(w.out[:8], "big")

    sizes = [asyncio.run(pull(greedy)) for _ in range(MAX_PULLS + 2)]
    assert sizes == [1000] * MAX_PULLS + [0, 0]  # then "not served"
    assert asyncio.run(pull(other)) == 1000  # others are not affected
    assert server.refused == {"12D3KooWgreedy": 2}


def test_made_up_identities_cannot_grow_a_nodes_per_peer_state_or_its_metrics_rows():
    """Identities cost nothing: garbage from 10,000 of them is counted, but what a node keeps per identity is
    bounded, and a round's metrics row lists the peers active last, not everyone ever seen."""
    import json

    from p2pswarm.bounded import MAX_PEERS

    me, friend = Identity.generate(), Identity.generate()
    comm = InProcessComm(InProcessHub(), me, "swarm")
    comm.set_ban_policy(1, 3600)  # every garbage sender is banned at once: the ledger grows too
    assert comm.accept(wire.encode(wire.RolloutBatch("swarm", 0, 0, friend.peer_id, []), friend), round=0, stage=0,
                       sender=friend.peer_id) is not None
    for i in range(10_000):
        comm.accept(b"\x93garbage", round=0, stage=0, sender=f"12D3KooWfake{i:06d}")
        comm.peer_info(f"12D3KooWfake{i:06d}", f"name{i}", 0, 0.0)
    assert comm.inbox.drops["malformed"] == 10_000  # every one counted
    for table in (comm.per_peer, comm.names, comm.ledger.bans, comm.ledger.until, comm.ledger.reason,
                  comm.inbox.groups_from):
        assert len(table) <= MAX_PEERS
    row = comm.counters()
    assert len(row["per_peer"]) <= 2 * 256 and len(json.dumps(row)) < 2 * 256 * 200  # ~100 bytes a peer row
    assert "12D3KooWfake009999" in row["per_peer"]  # the newest are kept
    assert comm.ledger.banned("12D3KooWfake009999")

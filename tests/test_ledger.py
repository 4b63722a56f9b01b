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

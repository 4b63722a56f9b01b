"""The wire format: a good batch round-trips; every kind of bad batch is rejected with its reason."""

import msgpack
import pytest

from p2pswarm import wire
from p2pswarm.identity import Identity, friendly_name
from p2pswarm.types import Group, Task


@pytest.fixture(scope="module")
def alice():
    return Identity.generate()


def batch(ident, round=3, stage=0, swarm="exp", n_groups=2, completion="<answer>5</answer>"):
    groups = [
        Group(Task(f"t{i}", "chain_sum", "2 + 3 =", "5", {"source_dataset": "chain_sum", "difficulty": [1, 2]}),
              [completion, "<answer>4</answer>"], peer=ident.peer_id, rewards=[1.0, 0.0])
        for i in range(n_groups)
    ]
    return wire.RolloutBatch(swarm, round, stage, ident.peer_id, groups)


def reason(data, **kw):
    kw.setdefault("swarm", "exp")
    with pytest.raises(wire.WireError) as e:
        wire.decode(data, **kw)
    return e.value.reason


def test_round_trip(alice):
    b = wire.decode(wire.encode(batch(alice), alice), swarm="exp", current_round=3, expect_peer=alice.peer_id)
    assert (b.round, b.stage, b.peer, len(b.groups)) == (3, 0, alice.peer_id, 2)
    g = b.groups[0]
    assert g.completions == ["<answer>5</answer>", "<answer>4</answer>"]
    assert g.sender_rewards == [1.0, 0.0] and g.rewards == []  # claimed rewards are advisory only
    assert g.task.metadata == {"source_dataset": "chain_sum", "difficulty": [1, 2]}
    assert g.completion_ids is None  # swarm text is re-tokenised by the receiver


def test_tampered_body_fails_signature(alice):
    env = msgpack.unpackb(wire.encode(batch(alice), alice))
    env["body"] = env["body"].replace(b"<answer>5", b"<answer>6")
    assert reason(msgpack.packb(env)) == "bad_signature"


def test_key_of_another_peer_is_rejected(alice):
    mallory = Identity.generate()
    # Mallory signs a batch that claims to be Alice's: the key does not derive Alice's peer id.
    body = msgpack.unpackb(msgpack.unpackb(wire.encode(batch(mallory), mallory))["body"])
    body["peer"] = alice.peer_id
    raw = msgpack.packb(body, use_bin_type=True)
    env = {"v": 1, "body": raw, "key": mallory.public, "sig": mallory.sign(raw)}
    assert reason(msgpack.packb(env)) == "wrong_peer"
    # A valid batch relayed by someone other than its author, when the transport knows the sender.
    assert reason(wire.encode(batch(alice), alice), expect_peer=mallory.peer_id) == "wrong_peer"


@pytest.mark.parametrize("data, expected", [
    (b"\x00\x01garbage", "malformed"),
    (msgpack.packb([1, 2, 3]), "malformed"),
    (msgpack.packb({"v": 99, "body": b"", "key": b"", "sig": b""}), "bad_version"),
    (msgpack.packb({"v": 1, "body": b"x", "key": b"short", "sig": b"s"}), "malformed"),
])
def test_malformed_envelopes(data, expected):
    assert reason(data) == expected


def test_size_cap_swarm_round_window(alice):
    data = wire.encode(batch(alice, completion="x" * 5000, n_groups=4), alice)
    assert reason(data, limits=wire.Limits(max_bytes=1000)) == "too_large"
    assert reason(wire.encode(batch(alice, completion="x" * 100), alice), limits=wire.Limits(max_text=50)) == "too_large"
    assert reason(wire.encode(batch(alice, swarm="other"), alice)) == "wrong_swarm"
    assert reason(wire.encode(batch(alice, round=10), alice), current_round=3) == "round_window"


def test_schema_violations_in_a_correctly_signed_body(alice):
    def signed(body):
        raw = msgpack.packb(body, use_bin_type=True)
        return msgpack.packb({"v": 1, "body": raw, "key": alice.public, "sig": alice.sign(raw)})

    good = msgpack.unpackb(msgpack.unpackb(wire.encode(batch(alice), alice))["body"])
    for mutate in (
        lambda b: b.update(round=-1),
        lambda b: b.update(round="3"),
        lambda b: b.update(groups="nope"),
        lambda b: b["groups"][0].update(completions=[]),
        lambda b: b["groups"][0].update(completions=[1, 2]),
        lambda b: b["groups"][0].update(rewards=[float("nan")]),
        lambda b: b["groups"][0].update(question=None),
        lambda b: b["groups"][0].update(meta=[1]),
    ):
        body = msgpack.unpackb(msgpack.packb(good))
        mutate(body)
        assert reason(signed(body)) == "schema"


def test_inbox_counts_drops_and_replays(alice):
    inbox = wire.Inbox("exp")
    data = wire.encode(batch(alice), alice)
    assert inbox.accept(data, current_round=3) is not None
    assert inbox.accept(data, current_round=3) is None  # the same (peer, round, stage) again
    assert inbox.accept(b"junk") is None
    other_stage = wire.encode(batch(alice, stage=1), alice)
    assert inbox.accept(other_stage, current_round=3, slot=(3, 0)) is None  # not the slot being collected
    assert inbox.counters() == {"batches_received": 1, "bytes_received": len(data), "dropped_replay": 1, "dropped_malformed": 1,
                                "dropped_wrong_slot": 1}


def test_identity_file_is_private_and_stable(tmp_path):
    path = tmp_path / "keys" / "node.key"
    a = Identity.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    b = Identity.load_or_create(path)
    assert a.peer_id == b.peer_id and a.peer_id.startswith("12D3KooW")
    assert friendly_name(a.peer_id) == a.name and a.name.count("-") == 2
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not an Ed25519 identity"):
        Identity.load_or_create(path)

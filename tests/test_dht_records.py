"""DHT records under a real hivemind DHT (two nodes in this process): what a peer may store under the
swarm's keys. Only owner-signed dictionary entries of a known record kind with every field in range are
stored or read; anything else is refused by the validator of the node asked to store it, without a
traceback anywhere, and the honest records stay readable."""

from __future__ import annotations

import logging
import time

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from p2pswarm.comm.hivemind import records
from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig
from p2pswarm.identity import Identity

SWARM = "recs"


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class SignAnything(records.Ed25519OwnerValidator):
    """The attacker's validator: signs every record under its own marker, whatever the value holds."""

    def validate(self, record):
        return True


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    d = tmp_path_factory.mktemp("dht")
    handler = Collect()
    loggers = [logging.getLogger(n) for n in ("", "asyncio", "hivemind")]
    for lg in loggers:
        lg.addHandler(handler)
    started = []
    try:
        honest_id = Identity.load_or_create(d / "a.key")
        honest = HivemindNode(honest_id, d / "a.key", NetConfig(host="127.0.0.1")).start()
        started.append(honest)
        m_id = Identity.load_or_create(d / "m.key")
        mallory = HivemindNode(m_id, d / "m.key", NetConfig(host="127.0.0.1", initial_peers=honest.maddrs))
        mallory.validator = SignAnything(m_id)
        mallory.start()
        started.append(mallory)
        yield honest, mallory, handler
    finally:
        for n in reversed(started):
            n.close()
        for lg in loggers:
            lg.removeHandler(handler)


def member_value(**kw):
    v = {"name": "ann", "role": "trainer", "round": 3, "stage": 0, "finished": 2, "time": time.time(), "left": False,
         "bridged": 0}
    v.update(kw)
    return v


def store_raw(mallory, honest, key: str, value: bytes, subkey=None, expiration: float | None = None):
    """Ask the honest node to store exactly these bytes, past the attacker's own DHT client."""
    exp = get_dht_time() + 30 if expiration is None else expiration
    return mallory.call(mallory.dht.protocol.call_store(honest.p2p.peer_id, [DHTID.generate(source=key)], [value], exp,
                                                        subkeys=None if subkey is None else [subkey]), timeout=20)


def raw_request(mallory, honest, key: str, value: bytes, tag: bytes):
    """A StoreRequest with any bytes at all; the honest node's reply (None: it failed)."""
    from hivemind.proto import dht_pb2

    proto = mallory.dht.protocol
    req = dht_pb2.StoreRequest(keys=[DHTID.generate(source=key).to_bytes()], subkeys=[tag], values=[value],
                               expiration_time=[get_dht_time() + 30], in_cache=[False], peer=proto.node_info)

    async def send():
        try:
            return await proto.get_stub(honest.p2p.peer_id).rpc_store(req, timeout=5)
        except Exception:  # noqa: BLE001 - the honest handler failed: what we expect
            return None

    return mallory.call(send(), timeout=20)


def signed(node, key: str, value: dict, expiration: float) -> bytes:
    """The value bytes as the node's validator signs them under its own marker."""
    from hivemind.dht.validation import DHTRecord

    rec = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(node.validator.marker),
                    MSGPackSerializer.dumps(value), expiration)
    return node.validator.sign_value(rec)


def read_members(honest):
    got = honest.call(honest.dht.get(records.members_key(SWARM), latest=True), timeout=15)
    return records.parse_entries(got, bad := __import__("collections").Counter(), records.member), bad


def test_only_owner_signed_records_of_a_known_kind_are_stored(nodes):
    honest, mallory, logs = nodes
    key = records.members_key(SWARM)
    assert honest.call(honest.dht.store(key, member_value(), get_dht_time() + 15, subkey=honest.validator.marker),
                       timeout=15)
    before = dict(honest.validator.rejected)
    exp = get_dht_time() + 30
    attacks = {
        # a regular value: replaced the dictionary of members in every reply (a censorship), and bytes that are
        # not msgpack made hivemind's search callback raise (a traceback, and a get that never returned)
        "regular_garbage": (b"\xc1\xc1 not msgpack", None),
        "regular_msgpack": (MSGPackSerializer.dumps([1, 2, 3]), None),
        "regular_far_future": (MSGPackSerializer.dumps({"x": 1}), None),
        # dictionary entries whose subkey is not an owner marker, or not even bytes
        "subkey_int": (MSGPackSerializer.dumps({"x": 1}), 123),
        "subkey_str_garbage": (b"\xc1junk", "hi"),
        "subkey_plain_peer": (MSGPackSerializer.dumps(member_value()), honest.peer_id.encode()),
        # the owner's marker, not its signature
        "unsigned": (MSGPackSerializer.dumps(member_value()), mallory.validator.marker),
        # signed by the owner, fields out of range
        "nan_time": (signed(mallory, key, member_value(time=float("nan")), exp), mallory.validator.marker),
        "inf_bridged": (signed(mallory, key, member_value(bridged=float("inf")), exp), mallory.validator.marker),
        "huge_round": (signed(mallory, key, member_value(round=2**62), exp), mallory.validator.marker),
        "escape_name": (signed(mallory, key, member_value(name="\x1b[2Jpwned"), exp), mallory.validator.marker),
        "no_kind": (signed(mallory, key, {"hello": 1}, exp), mallory.validator.marker),
        # a msgpack ext type in a field nobody reads: every reader's hivemind would log a warning deserializing it
        "ext_type": (signed(mallory, key, member_value(x=msgpack.ExtType(63, b"x")), exp), mallory.validator.marker),
        # a good signed record with a byte after its signature (a `$` in the signature pattern let it through)
        "trailing_newline": (signed(mallory, key, member_value(), exp) + b"\n", mallory.validator.marker),
    }
    for name, (value, subkey) in attacks.items():
        expiration = get_dht_time() + 10**6 if name == "regular_far_future" else exp
        if name in ("nan_time", "inf_bridged", "huge_round", "escape_name", "no_kind", "trailing_newline", "ext_type"):
            expiration = exp  # the signature covers the expiration
        ok = store_raw(mallory, honest, key, value, subkey, expiration)
        assert ok in ([False], None), (name, ok)
        # the honest record is still what every read returns, at once and without errors
        t0 = time.monotonic()
        members, bad = read_members(honest)
        assert time.monotonic() - t0 < 10, name
        assert [m.peer_id for m in members] == [honest.peer_id], (name, members)
        assert not bad, (name, bad)
    # a subkey hivemind cannot even hash, and a whole-dictionary store whose bytes do not deserialize: the
    # first is refused by the validator, the second fails in hivemind before it (an error for the caller only)
    assert store_raw(mallory, honest, key, MSGPackSerializer.dumps({"x": 1}), [1, 2]) in ([False], None)
    for value in (b"\xc1garbage", b"\x93\x01\x02"):
        assert raw_request(mallory, honest, key, value, b"") is None
    # a whole dictionary whose subkey is an unknown ext type: hivemind deserializes it (and warns) before the
    # validator refuses the entry; that one warning is filtered out (records.quiet_hivemind_serializer)
    d = DictionaryDHTValue()
    d.store(msgpack.ExtType(63, b"x"), b"v", get_dht_time() + 30)
    assert raw_request(mallory, honest, key, MSGPackSerializer.dumps(d), b"").store_ok == [False]
    members, _ = read_members(honest)
    assert [m.peer_id for m in members] == [honest.peer_id]
    # a signed record that lives far longer than a member may
    far = get_dht_time() + 3600
    assert store_raw(mallory, honest, key, signed(mallory, key, member_value(), far), mallory.validator.marker,
                     far) in ([False], None)
    rejected = {k: v - before.get(k, 0) for k, v in honest.validator.rejected.items() if v > before.get(k, 0)}
    assert rejected.get("record_unowned", 0) >= 6 and rejected.get("record_unsigned", 0) >= 2
    assert rejected.get("record_malformed", 0) >= 6
    assert honest.validator.offenders[mallory.peer_id] >= 6  # the signed bad ones, under their owner
    assert not [r for r in logs.records if "ExtType" in r.getMessage()]
    noisy = [r for r in logs.records if r.levelno >= logging.WARNING and (r.exc_info or "Traceback" in r.getMessage())]
    assert not noisy, [r.getMessage() for r in noisy]
    assert not [r for r in logs.records if r.levelno >= logging.ERROR], [r.getMessage() for r in logs.records]


def test_parse_entries_never_raises_and_counts_each_bad_record_once():
    from collections import Counter
    from types import SimpleNamespace as NS

    owner = Identity.generate().peer_id
    marker = records.marker(owner)
    good = member_value()
    exp = time.time() + 10
    entries = {
        marker: NS(value=good, expiration_time=exp),
        records.marker(Identity.generate().peer_id): NS(value=member_value(bridged=float("inf")), expiration_time=exp),
        records.marker(Identity.generate().peer_id): NS(value=member_value(time=-1e308), expiration_time=exp),
        records.marker(Identity.generate().peer_id): NS(value=b"\xc1", expiration_time=exp),
        records.marker(Identity.generate().peer_id): NS(value=member_value(), expiration_time=float("nan")),
        records.marker(Identity.generate().peer_id): object(),  # not even an item
        b"plain": NS(value=good, expiration_time=exp),
        7: NS(value=good, expiration_time=exp),
    }
    result = NS(value=entries)
    counter, seen, blamed = Counter(), set(), []
    for _ in range(3):  # the same records come back on every poll
        out = records.parse_entries(result, counter, records.member, seen, blame=lambda p, r: blamed.append(p))
        assert [m.peer_id for m in out] == [owner]
    assert counter == {"record_malformed": 5, "record_unowned": 2}
    assert len(blamed) == 5 and owner not in blamed
    assert records.parse_entries(NS(value=None), counter, records.member) == []
    assert records.parse_entries(object(), counter, records.member) == []

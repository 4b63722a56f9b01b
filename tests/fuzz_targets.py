"""The fuzz targets: every decoder and validator of input from other peers, with hypothesis strategies.

Each `Target` has a parser and three streams of inputs:
    valid    built within every limit: must be accepted (so that a parser refusing everything fails)
    invalid  a valid input with one thing wrong, from a catalogue of known-invalid changes (a field of the
             wrong type, out of range, non-finite, too long, with control characters, missing; a signature
             that does not hold...): must be refused. "Invalid" is defined here, independently of the code
             under test, by how the input was built.
    any      anything: random bytes, arbitrary msgpack/JSON values in any field: must not raise, and what
             it accepts must satisfy the target's `invariant` (types and ranges of the parsed result)
Outcomes: accepted, refused, or escaped (an exception outside the parser's contract).

Used by tests/test_fuzz.py (a few dozen inputs per stream, derandomized: seconds) and bench/fuzz.py
(>= 100,000 inputs per target, figures in bench/results/fuzz.json). Time is frozen at NOW and keys are
fixed, so a run is reproducible.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from types import SimpleNamespace as NS
from typing import Any, Callable

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from p2pswarm import validate as V
from p2pswarm import wire
from p2pswarm.comm.drive import records as drive
from p2pswarm.comm.drive.store import parse_clock, parse_json
from p2pswarm.comm.hivemind import records
from p2pswarm.comm.hivemind.payloads import MAX_REQUEST, parse_request
from p2pswarm.comm.torchdist.group import parse_announcement, parse_ints
from p2pswarm.comm.torchdist.manager import HEADER
from p2pswarm.identity import Identity

NOW = 1_760_000_000.0  # 2025-10-09: every parser is asked with this as its clock
ALICE = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
BOB = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
SWARM = "fuzz"
LIMITS = wire.Limits(max_bytes=64 * 1024, max_groups=3, max_completions=3, max_text=48, max_meta_bytes=256, max_id=24)
INT64 = 2**63

ACCEPTED, REFUSED, ESCAPED = "accepted", "refused", "escaped"


def _floats(*args: Any, **kw: Any) -> st.SearchStrategy:
    # tests/conftest.py flushes denormals (torch.set_flush_denormal): hypothesis cannot make subnormal floats then
    kw.setdefault("allow_subnormal", False)
    return st.floats(*args, **kw)


@dataclass
class Target:
    name: str
    what: str
    parse: Callable[[Any], Any]  # the parsed value, or REFUSED; an exception is "escaped"
    valid: st.SearchStrategy
    invalid: st.SearchStrategy
    any: st.SearchStrategy
    invariant: Callable[[Any], bool] = lambda _: True
    refusals: tuple[type[BaseException], ...] = field(default=())  # exceptions that mean "refused"
    # For the bench's volume (bench/fuzz.py): how the invalid stream is built from parts, so that the parts
    # can be drawn once and recombined (`spec`), and invalid inputs that stay invalid whatever bytes of them
    # change (`sealed`: signed inputs with a bad field; changing the signed content breaks the signature,
    # not changing it keeps the bad field).
    spec: "Spec | None" = None
    sealed: st.SearchStrategy | None = None


@dataclass
class Spec:
    """Invalid inputs as a valid map (`base`) with one field given a bad value (`fields`) or, if required,
    removed; then `encode`d (signed, packed...). `json`: bad values must survive JSON."""

    base: st.SearchStrategy
    fields: dict[str, st.SearchStrategy]
    required: list[str]
    encode: Callable[[dict], Any]
    json: bool = False

    def invalid(self) -> st.SearchStrategy:
        bad = mutate(self.base, self.fields, self.required)
        return (bad.filter(_jsonable) if self.json else bad).map(self.encode)


def outcome(t: Target, x: Any) -> tuple[str, Any]:
    """(ACCEPTED, parsed) / (REFUSED, None) / (ESCAPED, exception)."""
    try:
        out = t.parse(x)
    except t.refusals or ():
        return REFUSED, None
    except Exception as e:  # noqa: BLE001 - what the fuzz counts
        return ESCAPED, e
    return (REFUSED, None) if out is REFUSED else (ACCEPTED, out)


# ---- values: good and bad ------------------------------------------------------------------------------------
_PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")) | st.just(" ")
_NONPRINTABLE = st.characters(categories=("Cc", "Cf", "Zl", "Zp")) | st.sampled_from("\x1b\x00\u202e\u2028\u00a0")


def _long(alphabet: st.SearchStrategy, n: int) -> st.SearchStrategy:
    """A string of more than n characters, cheaply (a short piece repeated)."""
    return st.builds(lambda s, k: (s * (n // len(s) + 1 + k))[: n + 1 + k], st.text(alphabet, min_size=1, max_size=4),
                     st.integers(0, 8))


def names(max_len: int = V.NAME_MAX) -> st.SearchStrategy:
    short = st.text(_PRINTABLE, min_size=1, max_size=min(max_len, 12))
    return short | st.builds(lambda s: (s * max_len)[:max_len], st.text(_PRINTABLE, min_size=1, max_size=3))


def bad_names(max_len: int = V.NAME_MAX) -> st.SearchStrategy:
    """Empty, too long, with a control / format / separator character (every max_len here is >= 24), or not a
    string."""
    with_ctrl = st.builds(lambda a, c, b: a + c + b, st.text(_PRINTABLE, max_size=6), _NONPRINTABLE,
                          st.text(_PRINTABLE, max_size=6))
    return st.just("") | _long(_PRINTABLE, max_len) | with_ctrl | not_str


def texts(max_len: int) -> st.SearchStrategy:
    return st.text(max_size=min(max_len, 16)) | st.builds(lambda s: (s * max_len)[:max_len], st.text(min_size=1, max_size=3))


def bad_texts(max_len: int) -> st.SearchStrategy:
    return _long(st.characters(), max_len) | not_str


_msgpack_int = st.integers(-INT64, 2 * INT64 - 1)  # every int msgpack can carry
not_str = st.none() | st.booleans() | st.integers(-5, 5) | _floats() | st.binary(max_size=4) | st.lists(_msgpack_int, max_size=2)
not_int = (_floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.text(max_size=4) | st.none()
           | st.binary(max_size=4) | st.lists(st.integers(0, 3), max_size=2))
not_num = st.booleans() | st.text(max_size=4) | st.none() | st.binary(max_size=4) | st.lists(st.integers(0, 3), max_size=2)


def ints(lo: int = V.INT_MIN, hi: int = V.INT_MAX) -> st.SearchStrategy:
    return st.integers(lo, hi - 1)


def bad_ints(lo: int = V.INT_MIN, hi: int = V.INT_MAX, wide: int = INT64) -> st.SearchStrategy:
    """Ints outside [lo, hi) (within [-wide, 2*wide): what msgpack can carry), and non-ints."""
    return st.integers(-wide, lo - 1) | st.integers(hi, 2 * wide - 1) | not_int


def times(ahead: float = V.TIME_AHEAD) -> st.SearchStrategy:
    return _floats(V.TIME_MIN, NOW + ahead) | st.integers(int(V.TIME_MIN), int(NOW))


def bad_times(ahead: float = V.TIME_AHEAD) -> st.SearchStrategy:
    return (st.sampled_from([math.nan, math.inf, -math.inf, -1e308, 1e308, 0, -1])
            | _floats(max_value=V.TIME_MIN, exclude_max=True, allow_nan=False)
            | _floats(min_value=NOW + ahead, exclude_min=True, allow_nan=False)
            | st.integers(-INT64, int(V.TIME_MIN) - 1) | st.integers(int(NOW + ahead) + 1, 2 * INT64 - 1) | not_num)


def plain_values(depth: int = 3) -> st.SearchStrategy:
    leaf = (st.none() | st.booleans() | st.integers(-INT64, INT64 - 1) | _floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=8))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=6).filter(lambda v: _depth(v) <= V.MAX_DEPTH)


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


def _nest(v: Any, n: int) -> Any:
    for _ in range(n):
        v = [v]
    return v


plain_maps = st.dictionaries(st.text(max_size=6), plain_values(), max_size=3)
bad_plain_maps = (
    not_str.filter(lambda v: not isinstance(v, dict))  # not a map
    | st.builds(lambda m, k, v: {**m, k: v}, plain_maps, st.text(max_size=6),
                st.sampled_from([math.nan, math.inf, -math.inf]) | st.integers(INT64, 2 * INT64 - 1)
                | st.binary(max_size=4) | st.builds(lambda x: _nest(x, V.MAX_DEPTH), st.integers(0, 3)))
    | st.builds(lambda m, k: {**m, k: 1}, plain_maps, st.binary(max_size=4))  # a key that is not a string
)


def mutate(base: st.SearchStrategy, fields: dict[str, st.SearchStrategy], required: list[str]) -> st.SearchStrategy:
    """`base` maps with one field made bad: given a bad value from `fields`, or removed when required."""
    bad = [st.builds(lambda m, v, k=k: {**m, k: v}, base, s) for k, s in fields.items()]
    bad += [base.filter(lambda m, k=k: k in m).map(lambda m, k=k: {x: y for x, y in m.items() if x != k}) for k in required]
    return st.one_of(bad)


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-INT64, 2 * INT64 - 1) | _floats() | st.text(max_size=12) | st.binary(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4) | _msgpack_int, c, max_size=4),
    max_leaves=10)


json_anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | _floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)


def sloppy(base: st.SearchStrategy, values: st.SearchStrategy = anything) -> st.SearchStrategy:
    """A valid map with one field replaced by, or added as, any value at all."""
    keys = st.sampled_from(["round", "stage", "peer", "name", "role", "time", "left", "bridged", "finished", "digest",
                            "size", "created", "started", "groups", "files", "node", "host", "pid", "output", "lockstep",
                            "key", "sig", "peer_id", "x"])
    return st.builds(lambda m, k, v: {**m, k: v}, base, keys, values)


# Extremes a generator rarely reaches: nesting past any parser's recursion, huge numbers, long runs.
EDGE_BYTES = [b"[" * 200_000, b"{\"a\":" * 50_000, b"\x91" * 200_000 + b"\x00", b"\x81\xa1a" * 100_000 + b"\x00",
              b"1" * 5000, b'{"round": ' + b"9" * 5000 + b"}", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
              b"\xc6\xff\xff\xff\xff", b"\x92" + b"\xcf" + b"\xff" * 8 + b"\xcb" + b"\x7f\xf8" + b"\x00" * 6,
              b'{"time": NaN}', b'{"time": Infinity}', b'{"time": -Infinity}', b"\xef\xbb\xbf{}", b"", b"\x00"]
edge_bytes = st.sampled_from(EDGE_BYTES)


# ---- the wire batch ---------------------------------------------------------------------------------------
L = LIMITS


def envelope(body: Any, ident: Identity = ALICE, *, v: Any = 1, key: Any = None, sig: Any = None) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb({"v": v, "body": raw, "key": ident.public if key is None else key,
                          "sig": ident.sign(raw) if sig is None else sig})


group_valid = st.fixed_dictionaries(
    {"id": names(L.max_id), "dataset": st.just("") | names(L.max_id), "question": texts(L.max_text),
     "answer": texts(L.max_text), "completions": st.lists(texts(L.max_text), min_size=1, max_size=L.max_completions)},
    optional={"meta": plain_maps, "rewards": st.lists(_floats(-wire.MAX_REWARD, wire.MAX_REWARD), max_size=L.max_completions),
              "recipe": plain_maps})
body_valid = st.fixed_dictionaries(
    {"swarm": st.just(SWARM), "round": ints(0), "stage": ints(0), "peer": st.just(ALICE.peer_id), "created": times(),
     "groups": st.lists(group_valid, max_size=L.max_groups)})

group_bad = mutate(group_valid, {
    "id": bad_names(L.max_id), "dataset": bad_names(L.max_id).filter(lambda v: v != ""),
    "question": bad_texts(L.max_text), "answer": bad_texts(L.max_text),
    "completions": (st.just([]) | st.lists(texts(8), min_size=L.max_completions + 1, max_size=L.max_completions + 3)
                    | st.lists(bad_texts(L.max_text), min_size=1, max_size=2) | not_str),
    "rewards": (st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 2e6, -2e6, True, "1", None]), min_size=1, max_size=2)
                | st.lists(_floats(-1, 1), min_size=L.max_completions + 1, max_size=L.max_completions + 2)
                | st.none() | _msgpack_int | st.text(max_size=3)),
    "meta": bad_plain_maps | st.builds(lambda s: {"k": s * 300}, st.text(min_size=1, max_size=1)),
    "recipe": bad_plain_maps.filter(lambda v: v is not None),
}, ["id", "dataset", "question", "answer", "completions"])

WIRE_SPEC = Spec(body_valid, {
    "round": bad_ints(0), "stage": bad_ints(0), "created": bad_times(),
    "peer": st.just(BOB.peer_id) | bad_names() | st.just(ALICE.peer_id[:-1] + "x"),
    "swarm": st.text(max_size=6).filter(lambda s: s != SWARM) | not_str,
    "groups": not_str.filter(lambda v: not isinstance(v, list)) | st.lists(group_valid, min_size=L.max_groups + 1,
                                                                         max_size=L.max_groups + 2)
              | st.lists(not_str.filter(lambda v: not isinstance(v, dict)), min_size=1, max_size=2),
}, ["round", "stage", "created", "peer", "swarm", "groups"], envelope)
wire_bad_group = st.builds(lambda b, g, i: envelope({**b, "groups": b["groups"][:i] + [g] + b["groups"][i:]}),
                           body_valid.filter(lambda b: len(b["groups"]) < L.max_groups), group_bad, st.integers(0, 3))
wire_sealed = WIRE_SPEC.invalid() | wire_bad_group  # signed by Alice, one field bad
wire_invalid = st.one_of(
    WIRE_SPEC.invalid(), wire_bad_group,
    st.builds(lambda b, v: envelope(b, v=v), body_valid, st.sampled_from([0, 2, True, 1.0, "1", None, b"\x01"])),
    st.builds(lambda b, k: envelope(b, key=k), body_valid, st.binary(max_size=40).filter(lambda k: k != ALICE.public)),
    st.builds(lambda b, s: envelope(b, sig=s), body_valid, st.binary(min_size=64, max_size=64)),
    st.builds(lambda b: envelope(b, BOB), body_valid),  # signed by Bob, names Alice
)


def flip(data: bytes, i: int, bit: int) -> bytes:
    b = bytearray(data)
    b[i % len(b)] ^= 1 << bit
    return bytes(b)


wire_bytes_invalid = st.one_of(
    st.builds(lambda b, i, bit: flip(envelope(b), i, bit), body_valid, st.integers(0, 10**6), st.integers(0, 7)),
    st.builds(lambda b, n: envelope(b)[: n % len(envelope(b))], body_valid, st.integers(0, 10**6)),  # cut short
    st.builds(lambda b, x: envelope(b) + x, body_valid, st.binary(min_size=1, max_size=8)),  # trailing bytes
    st.binary(min_size=L.max_bytes + 1, max_size=L.max_bytes + 1),
)


def _wire(data: bytes) -> Any:
    return wire.decode(data, swarm=SWARM, limits=LIMITS, now=NOW)


def _batch_ok(b: wire.RolloutBatch) -> bool:
    ok = (type(b.round) is int and 0 <= b.round < V.INT_MAX and type(b.stage) is int and 0 <= b.stage < V.INT_MAX
          and math.isfinite(b.created) and V.TIME_MIN <= b.created <= NOW + V.TIME_AHEAD and b.peer == ALICE.peer_id
          and b.swarm == SWARM and len(b.groups) <= L.max_groups)
    for g in b.groups:
        t = g.task
        ok = ok and (0 < len(t.task_id) <= L.max_id and t.task_id.isprintable() and len(t.question) <= L.max_text
                     and len(t.answer) <= L.max_text and 1 <= len(g.completions) <= L.max_completions
                     and all(type(c) is str and len(c) <= L.max_text for c in g.completions)
                     and all(math.isfinite(r) and abs(r) <= wire.MAX_REWARD for r in g.sender_rewards)
                     and _depth(t.metadata) <= V.MAX_DEPTH and isinstance(t.metadata, dict))
    return ok


def _msgpack_any() -> st.SearchStrategy:
    return anything.map(lambda v: msgpack.packb(v, use_bin_type=True))


WIRE_BYTES = Target(
    "wire_bytes", "wire.decode on raw bytes: random, and signed batches with a bit flipped, cut short or extended",
    _wire, body_valid.map(envelope), wire_bytes_invalid,
    st.binary(max_size=256) | _msgpack_any() | edge_bytes
    | st.builds(lambda b, i, x: (lambda e: e[: i % len(e)] + x + e[i % len(e):])(envelope(b)),
                body_valid, st.integers(0, 10**6), st.binary(max_size=6)),
    _batch_ok, (wire.WireError,), spec=WIRE_SPEC, sealed=wire_sealed)
WIRE_STRUCT = Target(
    "wire_struct", "wire.decode on well-signed msgpack bodies with fields of the wrong type or range",
    _wire, body_valid.map(envelope), wire_invalid,
    sloppy(body_valid).map(envelope) | st.builds(lambda b, g: envelope({**b, "groups": [g]}), body_valid,
                                                 sloppy(group_valid)),
    _batch_ok, (wire.WireError,), spec=WIRE_SPEC, sealed=wire_sealed)

# ---- DHT records ------------------------------------------------------------------------------------------
digests = st.binary(min_size=32, max_size=32)
member_valid = st.fixed_dictionaries(
    {"name": names(), "role": st.sampled_from(records.ROLES), "round": ints(), "stage": ints(0), "finished": ints(),
     "time": times()}, optional={"left": st.booleans(), "bridged": ints(0)})
MEMBER_FIELDS = ({
    "name": bad_names(), "role": st.text(max_size=8).filter(lambda r: r not in records.ROLES) | not_str,
    "round": bad_ints(), "stage": bad_ints(0), "finished": bad_ints(), "time": bad_times(),
    "left": not_str.filter(lambda v: type(v) is not bool), "bridged": bad_ints(0)},
    ["name", "role", "round", "stage", "finished", "time"])
member_bad = mutate(member_valid, *MEMBER_FIELDS)
announcement_valid = st.fixed_dictionaries({"digest": digests, "size": ints(1), "created": times()})
ANNOUNCEMENT_FIELDS = ({
    "digest": st.binary(max_size=64).filter(lambda d: len(d) != 32) | not_str.filter(lambda v: type(v) is not bytes),
    "size": bad_ints(1), "created": bad_times()}, ["digest", "size", "created"])
announcement_bad = mutate(announcement_valid, *ANNOUNCEMENT_FIELDS)
clock_valid = st.fixed_dictionaries({"round": ints(0), "started": times()})
CLOCK_FIELDS = ({"round": bad_ints(0), "started": bad_times()}, ["round", "started"])
clock_bad = mutate(clock_valid, *CLOCK_FIELDS)


def expirations(kind: str) -> st.SearchStrategy:
    return _floats(V.TIME_MIN, NOW + records.MAX_TTL[kind] + records.EXPIRY_SKEW)


def bad_expirations(kind: str) -> st.SearchStrategy:
    return bad_times(records.MAX_TTL[kind] + records.EXPIRY_SKEW)


def _record_target(kind: str, parse, valid, fields, ok) -> Target:
    def run(x):
        owner, value, expires = x
        return parse(owner, value, expires, now=NOW)

    bad = mutate(valid, *fields)
    invalid = (st.tuples(st.just(ALICE.peer_id), bad, expirations(kind))
               | st.tuples(st.just(ALICE.peer_id), valid, bad_expirations(kind)))
    return Target(f"dht_{kind}", f"records.{kind} (a {kind} record's fields)", run,
                  st.tuples(st.just(ALICE.peer_id), valid, expirations(kind)), invalid,
                  st.tuples(st.just(ALICE.peer_id), sloppy(valid) | anything, anything | expirations(kind)),
                  ok, (V.Invalid,), spec=Spec(valid, *fields, encode=lambda v: (ALICE.peer_id, v, NOW + 5.0)))


DHT_MEMBER = _record_target("member", records.member, member_valid, MEMBER_FIELDS, lambda m: (
    0 < len(m.name) <= V.NAME_MAX and m.name.isprintable() and m.role in records.ROLES
    and all(type(x) is int and -1 <= x < V.INT_MAX for x in (m.round, m.stage, m.finished, m.bridged))
    and 0 <= m.bridged <= records.MAX_BRIDGED and V.TIME_MIN <= m.time <= NOW + V.TIME_AHEAD and type(m.left) is bool
    and m.expires <= NOW + records.MAX_TTL["member"] + records.EXPIRY_SKEW))
DHT_ANNOUNCEMENT = _record_target("announcement", records.announcement, announcement_valid, ANNOUNCEMENT_FIELDS, lambda a: (
    len(a.digest) == 32 and type(a.size) is int and 1 <= a.size < V.INT_MAX
    and V.TIME_MIN <= a.created <= NOW + V.TIME_AHEAD))
DHT_CLOCK = _record_target("clock", records.clock, clock_valid, CLOCK_FIELDS, lambda c: (
    type(c.round) is int and 0 <= c.round < V.INT_MAX and V.TIME_MIN <= c.started <= NOW + V.TIME_AHEAD))

# parse_entries over whole DHT replies: never raises; what it returns are records of owned subkeys.
_marker = st.builds(records.marker, st.sampled_from([ALICE.peer_id, BOB.peer_id]))


def _entries(x):
    counter, seen = __import__("collections").Counter(), set()
    out = records.parse_entries(x, counter, lambda o, v, e: records.member(o, v, e, now=NOW), seen, relays=True)
    return out if out else REFUSED


def _one_entry(m: dict) -> NS:
    return NS(value={records.marker(ALICE.peer_id): NS(value=m, expiration_time=NOW + 5.0)})


_item = st.builds(NS, value=member_valid | member_bad | anything | st.binary(max_size=16),
                  expiration_time=expirations("member") | anything)
DHT_ENTRIES = Target(
    "dht_entries", "records.parse_entries over whole DHT replies (any subkeys, values, expirations, shapes)",
    _entries,
    st.builds(lambda m, v, e: NS(value={m: NS(value=v, expiration_time=e)}), _marker, member_valid, expirations("member")),
    st.one_of(  # nothing in these is a good owned record
        st.builds(lambda m, v, e: NS(value={m: NS(value=v, expiration_time=e)}), _marker, member_bad, expirations("member")),
        st.builds(lambda k, v, e: NS(value={k: NS(value=v, expiration_time=e)}),
                  st.binary(max_size=20) | _msgpack_int | st.text(max_size=8) | st.none(), member_valid, expirations("member")),
        st.just(None), st.builds(NS, value=anything.filter(lambda v: not isinstance(v, dict))),
    ),
    st.builds(NS, value=st.dictionaries(_marker | st.binary(max_size=8) | _msgpack_int, _item | anything, max_size=3))
    | anything | st.builds(NS, value=anything),
    lambda out: all(isinstance(m, records.Member) for m in out), spec=Spec(member_valid, *MEMBER_FIELDS, _one_entry))

# The validator, on records as hivemind hands them to it: (key hash, msgpack subkey, value bytes, expiration).
_KEY = bytes(20)


def _signed_record(ident: Identity, value: bytes, expiration: Any, subkey: bytes | None = None,
                   signer: Identity | None = None) -> DHTRecord:
    sub = MSGPackSerializer.dumps(records.marker(ident.peer_id)) if subkey is None else subkey
    rec = DHTRecord(_KEY, sub, value, expiration)
    signer = signer or ident
    return DHTRecord(_KEY, sub, value + b"[sig:" + signer.sign(records.Ed25519OwnerValidator._payload(rec)).hex().encode()
                     + b"]", expiration)


_VALIDATOR = records.Ed25519OwnerValidator(BOB)
_kind_valid = st.one_of(
    st.tuples(member_valid, expirations("member")), st.tuples(announcement_valid, expirations("announcement")),
    st.tuples(clock_valid, expirations("clock")))
_kind_bad = st.one_of(
    st.tuples(member_bad, expirations("member")), st.tuples(announcement_bad, expirations("announcement")),
    st.tuples(clock_bad, expirations("clock")), st.tuples(member_valid, bad_expirations("member").filter(
        lambda e: type(e) is float)),
    st.tuples(st.builds(lambda m, a: {**m, **a}, member_valid, announcement_valid), expirations("member")),  # two kinds
    st.tuples(st.builds(lambda m, s: {**m, "pad": s * 5000}, member_valid, st.text(min_size=1, max_size=1)),
              expirations("member")))  # over MAX_VALUE_BYTES


def _validate(rec: DHTRecord):
    reason, _ = _VALIDATOR.check(rec, now=NOW)
    return REFUSED if reason else rec


_pack = MSGPackSerializer.dumps
_validator_sealed = st.builds(lambda ve: _signed_record(ALICE, _pack(ve[0]), float(ve[1])), _kind_bad)
DHT_VALIDATOR = Target(
    "dht_validator", "Ed25519OwnerValidator.check on records as hivemind passes them (signature, subkey, kind, expiry)",
    _validate,
    st.builds(lambda ve: _signed_record(ALICE, _pack(ve[0]), float(ve[1])), _kind_valid),
    st.one_of(
        _validator_sealed,  # signed, bad content
        st.builds(lambda ve: DHTRecord(_KEY, _pack(records.marker(ALICE.peer_id)), _pack(ve[0]), float(ve[1])), _kind_valid),
        st.builds(lambda ve: _signed_record(ALICE, _pack(ve[0]), float(ve[1]), signer=BOB), _kind_valid),  # forged
        st.builds(lambda ve, s: _signed_record(ALICE, _pack(ve[0]), float(ve[1]), subkey=s), _kind_valid,
                  st.just(DHTProtocol.IS_REGULAR_VALUE) | st.just(DHTProtocol.IS_DICTIONARY) | (
                      anything.filter(lambda v: records.owner_of(v) is None).map(_pack))),  # not an owner marker
    ),
    st.builds(DHTRecord, st.binary(max_size=20) | anything, st.binary(max_size=60) | anything
              | _marker.map(_pack), st.binary(max_size=300) | anything, anything)
    | st.builds(lambda v, e: _signed_record(ALICE, v, e), st.binary(max_size=64) | _msgpack_any(), anything),
    lambda rec: True, sealed=_validator_sealed)


# ---- Drive files ------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except Exception:  # noqa: BLE001
        return False


def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def _signed_json(fields: dict, ident: Identity = ALICE) -> bytes:
    return drive.signed_record(ident, fields)


registration_valid = st.fixed_dictionaries(
    {"time": times()},
    optional={"name": names(), "node": st.just("ann"), "role": st.sampled_from(drive.ROLES), "round": ints(),
              "stage": ints(0), "left": st.booleans(), "finished": ints(), "bridged": ints(0)})
REGISTRATION_SPEC = Spec(registration_valid, {
    "time": bad_times(), "name": bad_names(), "node": names().filter(lambda n: n != "ann") | not_str,
    "role": st.text(max_size=8).filter(lambda r: r not in drive.ROLES) | not_str, "round": bad_ints(), "stage": bad_ints(0),
    "left": not_str.filter(lambda v: type(v) is not bool), "finished": bad_ints(), "bridged": bad_ints(0)}, ["time"],
    _signed_json, json=True)


def _tamper(data: bytes, i: int) -> bytes:
    obj = json.loads(data)
    k = sorted(k for k in obj if k != "sig")[i % (len(obj) - 1)]
    obj[k] = obj[k] + 1 if type(obj[k]) in (int, float) else (not obj[k] if type(obj[k]) is bool else str(obj[k]) + "x")
    return _json(obj)


def _registration(data: bytes):
    reg = drive.parse_registration("ann", parse_json(data), now=NOW)
    return REFUSED if reg is None else reg


DRIVE_REGISTRATION = Target(
    "drive_registration", "peers/<node>.json: parse_json + parse_registration (signed JSON, NaN/Infinity allowed by json)",
    _registration, registration_valid.map(_signed_json),
    st.one_of(REGISTRATION_SPEC.invalid(),
              st.builds(_tamper, registration_valid.map(_signed_json), st.integers(0, 20)),  # changed after signing
              st.builds(lambda f: _json(f), registration_valid)),  # not signed at all
    st.binary(max_size=200) | edge_bytes | json_anything.map(_json) | sloppy(registration_valid, json_anything).map(_signed_json)
    | sloppy(registration_valid, json_anything).map(_json),
    lambda r: (r.name.isprintable() and 0 < len(r.name) <= V.NAME_MAX and r.role in drive.ROLES
               and V.TIME_MIN <= r.time <= NOW + V.TIME_AHEAD and type(r.left) is bool
               and all(type(x) is int and -1 <= x < V.INT_MAX for x in (r.round, r.stage, r.finished))
               and 0 <= r.bridged <= drive.MAX_BRIDGED),
    spec=REGISTRATION_SPEC, sealed=REGISTRATION_SPEC.invalid())


clock_file_valid = st.fixed_dictionaries(
    {"round": ints(0)}, optional={"stage": ints(0), "started": times(), "updated": times(),
                                  "coordinator": st.just(ALICE.peer_id), "coordinator_name": names()})


CLOCK_FILE_SPEC = Spec(clock_file_valid, {"round": bad_ints(0, wide=10**30)}, ["round"], _json, json=True)


def _clock(data: bytes):
    c = parse_clock(parse_json(data), now=NOW)
    return REFUSED if c is None else c


def _clock_ok(c: dict) -> bool:
    t_ok = lambda t: t is None or (type(t) is float and V.TIME_MIN <= t <= NOW + V.TIME_AHEAD)  # noqa: E731
    return (type(c["round"]) is int and 0 <= c["round"] < V.INT_MAX and type(c["stage"]) is int
            and 0 <= c["stage"] < V.INT_MAX and t_ok(c["started"]) and t_ok(c["updated"])
            and (c["coordinator"] is None or c["coordinator"].startswith("12D3KooW"))
            and (c["coordinator_name"] is None or c["coordinator_name"].isprintable()))


DRIVE_CLOCK = Target(
    "drive_clock", "state/current_state.json: parse_json + parse_clock (its round required, the fork's fields optional)",
    _clock, clock_file_valid.map(_json),
    CLOCK_FILE_SPEC.invalid()
    | st.sampled_from([b"[]", b"null", b"1", b'"x"', b'{"round": NaN}', b'{"round": Infinity}', b'{"round": 1e400}']),
    st.binary(max_size=120) | json_anything.map(_json) | sloppy(clock_file_valid, json_anything).map(_json) | edge_bytes,
    _clock_ok, spec=CLOCK_FILE_SPEC)

_rel = st.lists(st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=8).filter(
    lambda p: p not in (".", "..")), min_size=1, max_size=3).map("/".join)
_files_valid = st.dictionaries(_rel, st.fixed_dictionaries({"size": st.integers(0, drive.MAX_FILE_BYTES - 1),
                                                           "sha256": st.binary(min_size=32, max_size=32).map(bytes.hex)}),
                               min_size=1, max_size=4)
manifest_valid = st.fixed_dictionaries({"node": names(), "round": ints(0), "time": times(), "files": _files_valid})
_bad_rel = (st.builds(lambda a: "../" + a, _rel) | st.builds(lambda a: "/" + a, _rel) | st.builds(lambda a: a + "/../x", _rel)
            | st.builds(lambda a, c: a + c, _rel, _NONPRINTABLE) | st.just("") | st.builds(lambda a: "a\\" + a, _rel)
            | _long(st.sampled_from("ab"), 255))
_bad_entry = (st.fixed_dictionaries({"size": bad_ints(0, drive.MAX_FILE_BYTES, wide=10**20),
                                     "sha256": st.binary(min_size=32, max_size=32).map(bytes.hex)})
              | st.fixed_dictionaries({"size": st.integers(0, 10), "sha256": st.text(max_size=70).filter(
                  lambda s: not (len(s) == 64 and all(c in "0123456789abcdef" for c in s))) | not_str})
              | not_str.filter(lambda v: not isinstance(v, dict)))
MANIFEST_SPEC = Spec(manifest_valid, {"node": bad_names(), "round": bad_ints(0, wide=10**20), "time": bad_times(),
                                      "files": st.just({}) | not_str.filter(lambda v: not isinstance(v, dict))},
                     ["node", "round", "time", "files"], _signed_json, json=True)
manifest_bad_files = st.one_of(
    st.builds(lambda m, r, e: {**m, "files": {**m["files"], r: e}}, manifest_valid, _bad_rel | _rel, _bad_entry),
    st.builds(lambda m, r: {**m, "files": {**m["files"], r: {"size": 1, "sha256": "0" * 64}}}, manifest_valid, _bad_rel),
).filter(_jsonable).map(_signed_json)
manifest_sealed = MANIFEST_SPEC.invalid() | manifest_bad_files


def _manifest(data: bytes):
    m = drive.parse_manifest(parse_json(data), now=NOW)
    return REFUSED if m is None else m


DRIVE_MANIFEST = Target(
    "drive_manifest", "checkpoints/<node>/round_N/manifest.json: parse_json + parse_manifest (paths, sizes, digests)",
    _manifest, manifest_valid.map(_signed_json),
    manifest_sealed | st.builds(_tamper, manifest_valid.map(_signed_json), st.integers(0, 9)),
    st.binary(max_size=200) | edge_bytes | sloppy(manifest_valid, json_anything).map(_signed_json)
    | st.builds(lambda m, f: {**m, "files": f}, manifest_valid,
                st.dictionaries(st.text(max_size=10), json_anything, max_size=3)).map(_signed_json),
    lambda m: m.round >= 0 and all(".." not in r.split("/") and not r.startswith("/") and r.isprintable()
                                   and 0 <= s < drive.MAX_FILE_BYTES and len(h) == 64 for r, (s, h) in m.files.items()),
    spec=MANIFEST_SPEC, sealed=manifest_sealed)

# ---- torch.distributed ------------------------------------------------------------------------------------
announce_valid = st.fixed_dictionaries(
    {"name": names(), "host": names(255), "pid": ints(0)},
    optional={"peer": st.just(ALICE.peer_id), "output": st.just("") | names(64),
              "lockstep": st.dictionaries(st.text(max_size=8), plain_values(), max_size=3)})
_packb = lambda v: msgpack.packb(v, use_bin_type=True)  # noqa: E731
ANNOUNCE_SPEC = Spec(announce_valid, {
    "name": bad_names(), "host": bad_names(255), "pid": bad_ints(0), "peer": bad_names() | st.just(ALICE.peer_id[:-2]),
    "output": bad_texts(4096) | st.builds(lambda c: "out" + c, _NONPRINTABLE), "lockstep": bad_plain_maps},
    ["name", "host", "pid"], _packb)


TORCH_ANNOUNCEMENT = Target(
    "torch_announcement", "group.parse_announcement: a rank's start-up announcement (msgpack)",
    parse_announcement, announce_valid.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    ANNOUNCE_SPEC.invalid() | st.just(None)
    | st.binary(min_size=1, max_size=8).map(lambda b: b"\xc1" + b),
    st.binary(max_size=120) | edge_bytes | _msgpack_any() | sloppy(announce_valid).map(_packb),
    lambda a: a["name"].isprintable() and 0 <= a["pid"] < V.INT_MAX,
    (V.Invalid, msgpack.UnpackException, ValueError), spec=ANNOUNCE_SPEC)

_int64 = st.integers(-INT64, INT64 - 1)  # what an int64 tensor holds
header_valid = st.tuples(*(ints(lo, hi) for lo, hi in HEADER)).map(list)
header_bad = st.builds(lambda h, i, v: h[:i] + [v] + h[i + 1:], header_valid, st.integers(0, 2),
                       st.integers(-INT64, -1)) | st.builds(
    lambda h, v: [h[0], h[1], v], header_valid, st.integers(HEADER[2][1], INT64 - 1)) | st.builds(
    lambda h, i, v: h[:i] + [v] + h[i + 1:], header_valid, st.integers(0, 1), st.integers(V.INT_MAX, INT64 - 1)) | (
    st.lists(_int64, max_size=5).filter(lambda r: len(r) != 3))
_HEADER_KEYS = ("round", "stage", "size")
HEADER_SPEC = Spec(st.fixed_dictionaries(dict(zip(_HEADER_KEYS, (ints(lo, hi) for lo, hi in HEADER)))),
                   {k: st.integers(-INT64, lo - 1) | st.integers(hi, INT64 - 1) for k, (lo, hi) in zip(_HEADER_KEYS, HEADER)},
                   list(_HEADER_KEYS), lambda m: [m[k] for k in _HEADER_KEYS if k in m])
TORCH_HEADER = Target(
    "torch_header", "torch.distributed rollout header [round, stage, size] (parse_ints with manager.HEADER)",
    lambda row: parse_ints(row, "header", HEADER), header_valid, header_bad,
    st.lists(_int64, max_size=4) | anything,
    lambda h: all(lo <= v < hi for v, (lo, hi) in zip(h, HEADER)), (V.Invalid,), spec=HEADER_SPEC)

# ---- payload requests ---------------------------------------------------------------------------------------
request_valid = st.tuples(ints(0), ints(0)).map(list) | st.tuples(ints(0), ints(0), st.just(ALICE.peer_id)).map(list)
request_bad = st.one_of(
    st.tuples(bad_ints(0), ints(0)).map(list), st.tuples(ints(0), bad_ints(0)).map(list),
    st.tuples(ints(0), ints(0), bad_names() | st.just("")).map(list),
    st.lists(ints(0), max_size=5).filter(lambda r: len(r) not in (2, 3)),
    st.just({"round": 1}), st.tuples(ints(0), ints(0), st.just(ALICE.peer_id), _msgpack_int).map(list))


REQUEST_SPEC = Spec(st.fixed_dictionaries({"round": ints(0), "stage": ints(0)}, optional={"origin": st.just(ALICE.peer_id)}),
                    {"round": bad_ints(0), "stage": bad_ints(0), "origin": bad_names() | st.just("")}, ["round", "stage"],
                    lambda m: msgpack.packb([m[k] for k in ("round", "stage", "origin") if k in m], use_bin_type=True))


def _request(data: bytes):
    r = parse_request(data)
    return REFUSED if r is None else r


PAYLOAD_REQUEST = Target(
    "payload_request", "payloads.parse_request: a pull request on the payload stream",
    _request, request_valid.map(msgpack.packb),
    request_bad.map(lambda v: msgpack.packb(v, use_bin_type=True)) | st.binary(min_size=MAX_REQUEST + 1, max_size=MAX_REQUEST + 9),
    st.binary(max_size=140) | edge_bytes | _msgpack_any(),
    lambda r: 0 <= r[0] < V.INT_MAX and 0 <= r[1] < V.INT_MAX and (r[2] == "" or r[2].startswith("12D3KooW")),
    spec=REQUEST_SPEC)

# ---- the gossip topic (comm/hivemind/gossip.py) --------------------------------------------------------------
def _recent() -> st.SearchStrategy:
    return _floats(min_value=-10.0, max_value=0.0).map(lambda d: NOW + d)


_digest = st.binary(min_size=32, max_size=32)
_heartbeat = st.fixed_dictionaries(
    {"k": st.just("h"), "name": names(), "role": st.sampled_from(records.ROLES), "round": ints(), "stage": ints(0),
     "finished": ints(), "time": _recent()}, optional={"left": st.booleans(), "bridged": ints(0), "paused": st.booleans()})
_announced = st.fixed_dictionaries(
    {"k": st.just("a"), "round": ints(0), "stage": ints(0), "digest": _digest, "size": ints(1), "created": times(0)},
    optional={"groups": ints(0, 100), "origin": st.just(ALICE.peer_id)})
_announced_member = st.fixed_dictionaries(  # an own announcement that is also its author's heartbeat
    {"k": st.just("a"), "round": ints(0), "stage": ints(0), "digest": _digest, "size": ints(1), "created": times(0),
     "name": names(), "role": st.sampled_from(records.ROLES), "finished": ints()},
    optional={"groups": ints(0, 100), "bridged": ints(0), "paused": st.booleans()})
_clocked = st.fixed_dictionaries({"k": st.just("c"), "round": ints(0), "started": times(0)})
gossip_valid = _heartbeat | _announced | _announced_member | _clocked
_bad_kind = st.sampled_from(["x", "", "hh"]) | st.integers(-INT64, INT64 - 1)  # what msgpack can pack
gossip_invalid = st.one_of(
    mutate(_heartbeat, {"k": _bad_kind, "name": bad_names(), "round": bad_ints(), "stage": bad_ints(0),
                        "time": bad_times() | _floats(min_value=V.TIME_MIN, max_value=NOW - 60), "left": not_num.filter(lambda v: type(v) is not bool) | st.integers(-INT64, INT64 - 1),
                        "bridged": bad_ints(0)}, ["k", "name", "role", "round", "stage", "finished", "time"]),
    mutate(_announced, {"k": _bad_kind, "round": bad_ints(0), "stage": bad_ints(0), "digest": st.binary(max_size=31),
                        "size": bad_ints(1), "created": bad_times(), "origin": bad_names()},
           ["digest", "size", "created", "round", "stage"]),
    mutate(_announced_member, {"name": bad_names(), "finished": bad_ints(), "bridged": bad_ints(0),
                               "paused": st.integers(-INT64, INT64 - 1) | st.text(max_size=4) | st.none()}, ["name", "finished"]),  # without role: a plain announcement
    mutate(_clocked, {"k": _bad_kind, "round": bad_ints(0), "started": bad_times()}, ["round", "started"]),
).map(lambda m: msgpack.packb(m, use_bin_type=True))


def _gossip(data: bytes):
    from p2pswarm.comm.hivemind import gossip

    return gossip.parse(ALICE.peer_id, data, now=NOW)


GOSSIP_MESSAGE = Target(
    "gossip_message", "gossip.parse: a heartbeat, announcement or clock message from the swarm's topic",
    _gossip, gossip_valid.map(lambda m: msgpack.packb(m, use_bin_type=True)),
    gossip_invalid | st.binary(min_size=1, max_size=8).map(lambda b: b"\xc1" + b),
    st.binary(max_size=200) | edge_bytes | _msgpack_any(),
    lambda out: out[0] in ("h", "a", "c"), (V.Invalid,))


def _catchup(data: bytes):
    from p2pswarm.comm.hivemind.gossip import parse_catchup_request

    r = parse_catchup_request(data)
    return REFUSED if r is None else r


CATCHUP_REQUEST = Target(
    "catchup_request", "gossip.parse_catchup_request: what a peer asks on the catch-up stream",
    _catchup, st.tuples(ints(), ints(0)).map(list).map(msgpack.packb),
    st.tuples(bad_ints(), ints(0)).map(list).map(msgpack.packb) | st.binary(min_size=65, max_size=80),
    st.binary(max_size=80) | edge_bytes | _msgpack_any(),
    lambda r: -1 <= r[0] < V.INT_MAX and 0 <= r[1] < V.INT_MAX)

TARGETS = [WIRE_BYTES, WIRE_STRUCT, DHT_MEMBER, DHT_ANNOUNCEMENT, DHT_CLOCK, DHT_ENTRIES, DHT_VALIDATOR,
           DRIVE_REGISTRATION, DRIVE_CLOCK, DRIVE_MANIFEST, TORCH_ANNOUNCEMENT, TORCH_HEADER, PAYLOAD_REQUEST,
           GOSSIP_MESSAGE, CATCHUP_REQUEST]

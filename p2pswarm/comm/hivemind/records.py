"""The swarm's records: members, rollout announcements, the round clock, every field checked; and what the DHT
admits.

    member        {name, role, round, stage, finished, time, left, bridged, paused}
    announcement  {digest, size, created}  "I have (r, s)" (`origin`: a bridge relays origin's signed payload)
    clock         {round, started}

They travel as messages on the swarm's GossipSub topic (gossip.py, which parses them with `member`,
`announcement` and `clock`, built on p2pswarm/validate.py; the table with the limits is in docs/hivemind.md).
The DHT holds none of them any more: it is the routing gossip forms its mesh over. Its validator still
admits only records of these shapes, owner-signed, under the keys below, so that no peer can use the
swarm's DHT nodes as a free store, or have a reply of theirs censor a key:

    p2pswarm/<swarm>/members            subkey = owner marker
    p2pswarm/<swarm>/rollouts/<r>/<s>   subkey = owner marker (or marker~origin)
    p2pswarm/<swarm>/clock              subkey = owner marker

The owner marker `[ed-owner:<peer id>]` in a subkey makes the record owner-protected: every DHT node that
stores or returns it checks an Ed25519 signature by the key the peer id encodes (`Ed25519OwnerValidator`),
so nobody can write under someone else's marker. hivemind's own RSASignatureValidator would need a second
key per peer; this one reuses the libp2p identity, so the record's owner *is* the peer id. `parse_entries`
reads such records from a DHT reply, never raises, and counts each bad record once.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from p2pswarm.bounded import RecentCounter
from p2pswarm import validate as V
from p2pswarm.identity import Identity, verify
from p2pswarm.validate import public_from_peer_id  # noqa: F401 - kept importable from here

log = logging.getLogger(__name__)

_PEER_ID = rb"12D3KooW[1-9A-HJ-NP-Za-km-z]{44}"
# \Z, not $: `$` also matches before a final newline, and a value signed then given a trailing b"\n" would pass
# the check while hivemind's strip_value left the newline in it (its msgpack then fails to load in every reader).
_SIG = re.compile(rb"\[sig:([0-9a-f]{128})\]\Z")


def marker(peer_id: str) -> bytes:
    return b"[ed-owner:" + peer_id.encode() + b"]"


_OWNED_SUBKEY = re.compile(rb"\[ed-owner:(" + _PEER_ID + rb")\](?:~(" + _PEER_ID + rb"))?")


def owner_of(subkey: Any) -> tuple[str, str | None] | None:
    """(owner, origin) of a subkey `[ed-owner:OWNER]` or `[ed-owner:OWNER]~ORIGIN` (a bridge relaying ORIGIN's
    signed payload), its marker already verified by the validator; None for any other subkey."""
    if isinstance(subkey, bytes):
        m = _OWNED_SUBKEY.fullmatch(subkey)
        if m:
            return m.group(1).decode(), m.group(2).decode() if m.group(2) else None
    return None


def relay_subkey(owner_marker: bytes, origin: str) -> bytes:
    return owner_marker + b"~" + origin.encode()


class Ed25519OwnerValidator(RecordValidatorBase):
    """Signs this peer's records, and admits into the DHT only records of the swarm's own shape.

    hivemind calls validate() on every record this node is asked to store and on every record in every
    reply it gets; a refused record is neither stored nor returned. A record is admitted only if
      - its subkey is an owner marker (`[ed-owner:OWNER]`, or `[ed-owner:OWNER]~ORIGIN` for a relay) and
        nothing else: a regular value (no subkey) or a subkey of another type is refused;
      - its value carries OWNER's Ed25519 signature over (key, subkey, value, expiration);
      - the signed value is a msgpack map that parses as exactly one record kind (member, announcement,
        clock: `kind_of`), every field in range, and it expires within that kind's MAX_TTL.
    Everything the swarm stores is like that, so honest records are never refused. What this keeps out:
    an unsigned regular value under our keys replaces the whole dictionary of records in every reply
    (members and announcements vanish: a censorship), and one that does not deserialize makes hivemind's
    search callback raise (a traceback in every log, and the `get` never returns); a signed record with
    fields out of range would reach the peers' arithmetic; a far-future expiration would keep a member
    that left alive for ever.

    validate() never raises: a record it cannot make sense of is refused, counted by reason in `rejected`,
    and, when its owner's signature held, under that owner in `offenders`.
    The marker must not start with `[owner:`: hivemind's RSASignatureValidator would try to parse it."""

    CACHE_SIZE = 8192
    MAX_OFFENDERS = 4096

    def __init__(self, identity: Identity):
        quiet_hivemind_serializer()
        self.identity = identity
        self.marker = marker(identity.peer_id)
        self.rejected: Counter[str] = Counter()  # records refused, by reason (another peer's forgeries, ...)
        self.offenders: Counter[str] = RecentCounter()  # signed records refused for their content, by owner
        # hivemind re-validates every record in every reply on every poll: without this cache signature
        # checks took 63% of a 16-peer process's CPU, and a 64-peer swarm delivered 16% instead of 85%.
        # (It also makes each distinct bad record count once.)
        self._verdicts: OrderedDict[tuple, bool] = OrderedDict()

    @property
    def local_public_key(self) -> bytes:
        return self.marker

    @staticmethod
    def _payload(record: DHTRecord) -> bytes:
        return MSGPackSerializer.dumps(dataclasses.astuple(record))

    def validate(self, record: DHTRecord) -> bool:
        try:
            key = (record.key, record.subkey, record.value, record.expiration_time)
            verdict = self._verdicts.get(key)
        except Exception:  # noqa: BLE001 - an unhashable field: not a record hivemind would make
            self.rejected["record_malformed"] += 1
            return False
        if verdict is None:
            reason, owner = self.check(record)
            verdict = reason is None
            if reason is not None:
                self.rejected[reason] += 1
                if owner is not None and (owner in self.offenders or len(self.offenders) < self.MAX_OFFENDERS):
                    self.offenders[owner] += 1
                log.debug("refused a DHT record: %s", reason)
            self._verdicts[key] = verdict
            if len(self._verdicts) > self.CACHE_SIZE:
                self._verdicts.popitem(last=False)
        else:
            self._verdicts.move_to_end(key)
        return verdict

    def check(self, record: DHTRecord, now: float | None = None) -> tuple[str | None, str | None]:
        """(None, owner) for an admissible record, else (reason, owner whose signature held, or None).
        Never raises."""
        try:
            return self._check(record, now)
        except Exception as e:  # noqa: BLE001 - whatever a peer sends, refuse it; never raise into hivemind
            log.debug("DHT record check: %s: %s", type(e).__name__, e)
            return "record_malformed", None

    def _check(self, record: DHTRecord, now: float | None) -> tuple[str | None, str | None]:
        subkey, value = record.subkey, record.value
        if type(subkey) is not bytes or type(value) is not bytes or type(record.key) is not bytes:
            return "record_malformed", None
        if len(value) > MAX_VALUE_BYTES:
            return "record_too_large", None
        try:  # plain msgpack, no ext types: hivemind's loads() would log a warning for an unknown one
            owned = owner_of(msgpack.unpackb(subkey, raw=False))
        except Exception:  # noqa: BLE001 - not msgpack: not a subkey we write
            owned = None
        if owned is None:
            return "record_unowned", None
        m = _SIG.search(value)
        if not m:
            return "record_unsigned", None
        owner = owned[0]
        try:
            public = public_from_peer_id(owner)
        except ValueError:
            return "record_bad_owner", None
        stripped = dataclasses.replace(record, value=value[: m.start()])
        if not verify(public, bytes.fromhex(m.group(1).decode()), self._payload(stripped)):
            return "record_forged", None
        try:
            # Plain data all through (no msgpack ext type anywhere, even in a field we do not read): every reader's
            # hivemind deserializes the whole value, and an unknown ext type makes it log a warning each time.
            fields = V.plain(V.mapping(msgpack.unpackb(stripped.value, raw=False), "record"), "record", blobs=True)
            _kind, parse = kind_of(fields)
            parse(owner, fields, record.expiration_time, now=now)
        except Exception as e:  # noqa: BLE001 - the owner signed a record the swarm cannot use
            log.debug("refused %s's DHT record: %s", owner[-8:], V.clip(str(e), 120))
            return "record_malformed", owner
        return None, owner

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.marker not in record.key and self.marker not in (record.subkey or b""):
            return record.value
        return record.value + b"[sig:" + self.identity.sign(self._payload(record)).hex().encode() + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        return _SIG.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, Ed25519OwnerValidator)


class _DropUnknownExtType(logging.Filter):
    """Drops hivemind's "Unknown ExtType code" warning. hivemind deserializes a whole dictionary value (a peer's
    store request, or its reply to our `get`) before any validator sees its entries, and logs that warning for
    every msgpack ext type it does not know: any peer could fill our log with it. The records themselves are
    refused by the validator (no ext type is admitted); only this one message of this one logger is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown ExtType code")


_EXT_FILTER = _DropUnknownExtType()


def quiet_hivemind_serializer() -> None:
    """Install the filter above (idempotent); called by every validator, so every node that runs one has it."""
    lg = logging.getLogger("hivemind.utils.serializer")
    if _EXT_FILTER not in lg.filters:
        lg.addFilter(_EXT_FILTER)


# ---- keys and values ------------------------------------------------------------------------------------
def members_key(swarm: str) -> str:
    return f"p2pswarm/{swarm}/members"


def rollouts_key(swarm: str, round: int, stage: int) -> str:
    return f"p2pswarm/{swarm}/rollouts/{round}/{stage}"


def clock_key(swarm: str) -> str:
    return f"p2pswarm/{swarm}/clock"


@dataclasses.dataclass
class Member:
    peer_id: str
    name: str
    role: str  # "trainer" or "bootstrap"
    round: int
    stage: int
    finished: int  # the last round this peer finished (-1: none)
    time: float
    left: bool
    expires: float
    bridged: int = 0  # peers on the other side of a bridge (comm=hybrid) whose batches this one relays
    paused: bool = False  # paused by its user: nobody waits for it until it plays again


@dataclasses.dataclass
class Announcement:
    peer_id: str  # who serves the payload
    digest: bytes
    size: int
    created: float
    origin: str | None = None  # whose signed payload it is, when a bridge relays it (else peer_id's own)
    # what a gossiped announcement adds (gossip.py): its slot, a hint of the batch's worth, and the batch
    # itself when it is small enough to travel on the topic (b"": pull it)
    round: int = -1
    stage: int = 0
    groups: int = 0
    signal: int = 0
    data: bytes = b""
    member: Member | None = None  # the author's heartbeat fields, carried by its own announcement (gossip.py)

    @property
    def signer(self) -> str:
        return self.origin or self.peer_id


@dataclasses.dataclass
class Clock:
    peer_id: str
    round: int
    started: float
    shards: int = 1  # topic shards the keeper says the swarm announces in (gossip.topic)


# ---- parsing: every field checked (p2pswarm/validate.py) --------------------------------------------------
# A record may live at most this long (DHT expiration minus now): a longer one would outlive the peer that
# wrote it. Members are refreshed every few seconds and expire in 15 (manager.MEMBER_TTL): a ghost member
# makes every collect wait for it, so its bound is tight. Announcements last max(60, 4 x collect_timeout).
MAX_TTL = {"member": 120.0, "announcement": 24 * 3600.0, "clock": 600.0}
EXPIRY_SKEW = 30.0  # peers' clocks differ by at most max_clock_skew (3 s) at start; a little more later
MAX_VALUE_BYTES = 4096  # a record's value, signature included (real ones are ~100-250 bytes)
ROLES = ("trainer", "bootstrap")
MAX_BRIDGED = 1024  # a member cannot make every collect wait for more relayed peers than this


def member(owner: str, v: dict, expires: float, now: float | None = None) -> Member:
    return Member(owner, V.field(v, "name", V.name), V.field(v, "role", V.choice, ROLES),
                  V.field(v, "round", V.integer), V.field(v, "stage", V.integer, 0),
                  V.field(v, "finished", V.integer), V.field(v, "time", V.timestamp, now),
                  V.field(v, "left", V.flag, default=False), _expiration(expires, "member", now),
                  min(V.field(v, "bridged", V.integer, 0, default=0), MAX_BRIDGED),
                  V.field(v, "paused", V.flag, default=False))


def announcement(owner: str, v: dict, expires: float, now: float | None = None) -> Announcement:
    _expiration(expires, "announcement", now)
    return Announcement(owner, V.field(v, "digest", V.blob, 32), V.field(v, "size", V.integer, 1),
                        V.field(v, "created", V.timestamp, now))


def clock(owner: str, v: dict, expires: float, now: float | None = None) -> Clock:
    _expiration(expires, "clock", now)
    return Clock(owner, V.field(v, "round", V.integer, 0), V.field(v, "started", V.timestamp, now))


def _expiration(expires: Any, kind: str, now: float | None = None) -> float:
    """A record's DHT expiration: finite, and at most MAX_TTL[kind] (plus the clock skew peers are held
    to) after now."""
    now = time.time() if now is None else now
    return V.real(expires, "expiration", V.TIME_MIN, now + MAX_TTL[kind] + EXPIRY_SKEW)


# Which parser a value is for, by the field only that kind has: the validator does not see the key (only
# its hash), so it tells the kinds apart by their shape.
KINDS = {"digest": ("announcement", announcement), "role": ("member", member), "started": ("clock", clock)}


def kind_of(v: dict) -> tuple[str, Any]:
    """(kind, parser) of a record value; Invalid when it is not exactly one of the three kinds."""
    found = [KINDS[k] for k in KINDS if k in v]
    if len(found) != 1:
        raise V.Invalid("record", "not exactly one record kind")
    return found[0]


def parse_entries(result: Any, counter: Counter[str], parse, seen: set | None = None, relays: bool = False,
                  blame: Callable[[str, str], None] | None = None) -> list:
    """Records of a DHT `get` result ({subkey: (value, expiration)}), each parsed with `parse(owner, value,
    expiration)`. Never raises, whatever `result` holds: unmarked subkeys and values that do not parse are
    skipped, and counted once each when `seen` remembers the bad ones already counted (the same record comes
    back on every poll), with one DEBUG line; `blame(owner, reason)` is called for a record whose owner the
    validator authenticated (its marker's signature holds) but whose fields are bad."""
    out = []
    try:
        items = list(result.value.items()) if result is not None and isinstance(result.value, dict) else []
    except Exception as e:  # noqa: BLE001 - not what hivemind returns; nothing to parse
        _bad(counter, seen, "record_malformed", "result", None, None, type(e).__name__, None)
        return out
    for subkey, item in items:
        owned = None
        try:
            owned = owner_of(subkey)
            if owned is None or owned[1] is not None and not relays:
                _bad(counter, seen, "record_unowned", subkey, item, None, "no owner marker", None)
                continue
            value = item.value
            if isinstance(value, bytes):
                value = msgpack.unpackb(value, raw=False)
            record = parse(owned[0], V.mapping(value, "record"), item.expiration_time)
            if owned[1] is not None:
                record.origin = owned[1]
            out.append(record)
        except Exception as e:  # noqa: BLE001 - a parser of network input never raises
            _bad(counter, seen, "record_malformed", subkey, item, owned[0] if owned else None,
                 str(e) if isinstance(e, V.Invalid) else type(e).__name__, blame)
    return out


def _bad(counter: Counter[str], seen: set | None, reason: str, subkey: Any, item: Any, owner: str | None,
         why: str, blame: Callable[[str, str], None] | None) -> None:
    """Count a bad record once (per subkey, reason and expiration), with one DEBUG line."""
    try:
        mark = (reason, V.clip(subkey, 200), repr(getattr(item, "expiration_time", None)))
    except Exception:  # noqa: BLE001
        mark = (reason, "?", "?")
    if seen is not None and mark in seen:
        return
    if seen is not None:
        seen.add(mark)
    counter[reason] += 1
    log.debug("dropped a DHT record (%s) under %s: %s", reason, mark[1], V.clip(why, 120))
    if blame is not None and owner is not None:
        try:
            blame(owner, reason)
        except Exception as e:  # noqa: BLE001 - accounting must not stop parsing
            log.debug("blame: %s", e)

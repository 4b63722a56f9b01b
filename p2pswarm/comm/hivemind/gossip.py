"""The swarm's topic: one GossipSub topic per swarm (`p2pswarm/<swarm>/v1`) carrying small signed messages;
past the keeper's shard size, one per shard (`.../v1/s<S>.<i>`, i = shard_of(peer id)) for heartbeats and
announcements, the base topic keeping the clock (docs/hivemind.md "Topic shards").

    heartbeat     {k: "h", name, role, round, stage, finished, time, left, bridged, paused}   only when its
                  author published nothing carrying these fields for MEMBER_REFRESH, and at once when its
                  finished round or pause changes (what the keeper's quorum and the holders read):
                  membership is who sent one, or an announcement, within MEMBER_TTL
    announcement  {k: "a", round, stage, digest, size, created, groups, signal[, origin][, data]
                  [, name, role, finished, time, bridged, paused]}   "I have (round, stage)"; `origin`: a
                  bridge serves that peer's signed batch; `data`: the batch itself, when it is small and its
                  sender may not be dialable (client mode). A peer's own announcement also carries its
                  heartbeat's fields (its position is the announced slot), so it IS that peer's heartbeat:
                  each topic message is forwarded by every peer to its mesh, so a peer's topic traffic is
                  N x (messages each peer sends), and one message per publish instead of three is what
                  keeps that small beside the K payload pulls. An announcement without them (a relay, or an
                  older peer) only keeps its author live.
    clock         {k: "c", round, started[, shards]}   the keeper's round (and topic shards), at every change and every 5 s; followers
                  take it only from the peer they trust (their initial peers, or coordinator_peer)

The author of every message is its pubsub `from`, signed by that peer's Ed25519 key (libp2p StrictSign,
checked again here: pubsub.verify_message), so a message needs no signature of its own and nobody can speak
for another peer. The fields are checked with the same parsers as the records the DHT used to hold
(records.member / announcement / clock, on p2pswarm/validate.py); an inline batch must match the
announced digest and size.

Every daemon forwards a message before any Python code sees it (no validators, no peer scoring in the
shipped p2pd), so `Book.handle` caps each author: at most MAX_MESSAGE bytes (MAX_INLINE with a batch) a
message, and a token bucket of messages and bytes. Whatever fails is dropped, counted by reason
(`dropped_gossip_<reason>`, overall and under its author) and, when its author is authenticated, is a
strike toward a ban (comm/core.py PeerLedger); nothing raises.

What a node keeps of the topic is bounded however many identities speak (identities cost nothing):
announcements only inside a window of rounds around this node's reference (the trusted clock, or the round
it plays) and at most MAX_ANNOUNCED of them / MAX_ANNOUNCED_BYTES in all, the oldest of authors it does not
know going first; an inline batch held once (in the signed message it came in); clocks only from the
peers it trusts (and a few others, never handed on); members capped and forgotten MEMBER_FORGET after they
went quiet; per-author rate buckets capped. Authors it does not know (not trusted, never delivered a valid
batch here) also share one global budget of messages and bytes a second, checked before a signature or a
byte of msgpack is looked at, and a message is unpacked under limits that bound its objects before any are
built (only an announcement's `data` may be large).

Gossip is not 100% delivery (a subscriber's buffer holds 32 messages; a peer that joins mid-round missed
what came before), so a node can ask peers directly for what they heard (`CATCHUP`): the signed messages
themselves, at most CATCHUP_MAX announcements of one (round, stage) plus the heartbeats and clocks they
hold, re-verified on arrival exactly like the topic's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack
from hivemind.proto import p2pd_pb2 as pb

from p2pswarm import validate as V
from p2pswarm.bounded import MAX_PEERS, Recent
from p2pswarm.comm.core import MAX_RELAYED_ORIGINS
from p2pswarm.comm.hivemind import records
from p2pswarm.comm.hivemind.payloads import READ_TIMEOUT, Bucket, StreamGate, read_request, send_within
from p2pswarm.comm.hivemind.pubsub import author_of, verify_message

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024  # a heartbeat, announcement or clock (real ones: 150-300 bytes)
MAX_INLINE = 64 * 1024  # an announcement that carries its batch; the daemon silently drops anything over 1 MiB
RATE, BURST = 8.0, 96.0  # messages per second per author, and the burst (a bridge announces its relays at once)
BYTE_RATE, BYTE_BURST = 48 * 1024.0, 384 * 1024.0  # bytes per second per author, and the burst
MEMBER_TTL = 15.0  # a peer is live while its last heartbeat is younger than this
MEMBER_REFRESH = 5.0  # a heartbeat goes out when its author published nothing with its fields for this long
CLOCK_REFRESH = 5.0
KEEP_ROUNDS = 4  # rounds of announcements remembered before the reference (and served to catch-up requests)
# Rounds past the reference (the trusted clock, or the round this node plays) an announcement may be for: peers
# run ahead of what a node knows of the clock (a node that just joined, a keeper that lost its state and
# catches up, self-paced peers, a peer resumed from a checkpoint). Far enough for those, and bounded: one
# author's slots are capped anyway (its oldest give way), and the table as a whole by MAX_ANNOUNCED(_BYTES).
AHEAD_ROUNDS = 32
MAX_SLOTS_PER_AUTHOR = 64  # (round, stage) slots one author's announcements may occupy at once (its oldest go)
MAX_ANNOUNCED = 16384  # announcements held, all authors together (the oldest of unknown authors go first)
MAX_ANNOUNCED_BYTES = 16 * 1024 * 1024  # and their bytes (an inline batch is held once, in its signed message)
HELD_OVERHEAD = 256  # bytes counted per held announcement beside its message
MAX_MEMBERS = MAX_PEERS  # members (and their last heartbeats) held
MEMBER_FORGET = 300.0  # seconds after its last word a member is forgotten (names are kept by the transport)
MAX_TRUSTED = 64  # authors whose clock is followed (initial peers, coordinator_peer, this node)
MAX_UNTRUSTED_CLOCKS = 16  # the last clocks of other authors, held in case one is trusted later; never handed on
MAX_AUTHORS = 4 * MAX_PEERS  # per-author rate buckets held (the least recently used forgotten first)
# Authors this node does not know (not trusted, no valid batch delivered here), all of them together: what
# their messages may cost before a signature is checked or a byte unpacked. Far above an honest swarm's
# traffic (the keeper hears at most ~512 trainers, each a message every few seconds, all at once at a
# publish), far below what makes a node fall behind its own topic.
UNKNOWN_RATE, UNKNOWN_BURST = 256.0, 4096.0
UNKNOWN_BYTE_RATE, UNKNOWN_BYTE_BURST = 4 * 1024 * 1024.0, 32 * 1024 * 1024.0
MAX_FIELDS = 32  # entries of a message's map (real ones: at most 16)
MAX_ITEMS = 16  # entries of a list or map inside it (real ones have none: unknown extra fields)
CATCHUP = "p2pswarm.catchup/1"
CATCHUP_MAX = 64  # announcements per reply, drawn at random among those held
CATCHUP_REPLY_BYTES = 512 * 1024
CATCHUP_MAX_ITEMS = 2 * CATCHUP_MAX + 1024  # messages in a reply: what a reply is built to and decoded to
MAX_CATCHUP_SERVING = 16  # catch-up requests handled at once
CATCHUP_RATE, CATCHUP_BURST = 1.0, 8.0  # catch-up requests per second per asking peer (an honest one: <= 0.5)


MAX_SHARDS = 4096
KEEPER_SHARDS = 16  # shards the keeper listens to (the first ones): all of a swarm up to ~500 trainers, a sample beyond


def topic(swarm: str, shards: int = 1, shard: int = 0) -> str:
    """The swarm's topic; with `shards` > 1, the topic of one shard (the base topic keeps the clock)."""
    base = f"p2pswarm/{swarm}/v1"
    return base if shards <= 1 else f"{base}/s{shards}.{shard}"


def shard_of(peer_id: str, shards: int) -> int:
    """The shard a peer announces and heartbeats in: fixed by its id, so nobody picks a crowd to join."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big") % max(1, shards)


def shards_for(trainers: int, shard_size: int, now: int = 1) -> int:
    """Topic shards for `trainers` live trainers at most `shard_size` each: the smallest power of two that
    does it. Fewer than `now` only once the shards would be at most a quarter full, so that a swarm near a
    boundary does not move its peers back and forth. shard_size <= 0: one topic."""
    if shard_size <= 0:
        return 1
    need = 1
    while need < MAX_SHARDS and trainers > need * shard_size:
        need *= 2
    if need < now and trainers * 4 > now * shard_size:
        return now
    return need


def is_swarm_topic(t: str, base: str) -> bool:
    """`t` is the swarm's base topic or one of its shards' (`<base>/s<S>.<i>`, 1 < S <= MAX_SHARDS, i < S)."""
    if t == base:
        return True
    head, _, tail = t.rpartition("/s")
    s, _, i = tail.partition(".")
    return (head == base and s.isdigit() and i.isdigit() and len(s) <= 4 and len(i) <= 4
            and 1 < int(s) <= MAX_SHARDS and int(i) < int(s) and tail == f"{int(s)}.{int(i)}")


# ---- messages -------------------------------------------------------------------------------------------------
def heartbeat(*, name: str, role: str, round: int, stage: int, finished: int, left: bool = False, bridged: int = 0,
              paused: bool = False) -> bytes:
    v = {"k": "h", "name": name, "role": role, "round": round, "stage": stage, "finished": finished,
         "time": time.time()}
    return msgpack.packb({**v, **_unless_default(left=left, bridged=bridged, paused=paused)})


def _unless_default(**fields: Any) -> dict[str, Any]:
    """The optional member fields that differ from what a reader assumes when they are absent (every peer
    forwards every byte of a topic message to its mesh)."""
    return {k: v for k, v in fields.items() if v}


def announcement(round: int, stage: int, digest: bytes, size: int, *, groups: int = 0, signal: int = 0,
                 origin: str | None = None, data: bytes = b"", member: dict[str, Any] | None = None) -> bytes:
    """`member`: the author's heartbeat fields (name, role, finished, bridged, paused) to carry, so that no
    heartbeat need go beside it; its position is (round, stage), its time `created`. Never with `origin`: a
    relay speaks for another peer's batch, not for its author's position."""
    now = time.time()
    v: dict[str, Any] = {"k": "a", "round": round, "stage": stage, "digest": digest, "size": size,
                         "created": now, "groups": groups, "signal": signal}
    if member is not None and origin is None:  # its time is `created`
        v.update({k: member[k] for k in ("name", "role", "finished")},
                 **_unless_default(bridged=member.get("bridged", 0), paused=member.get("paused", False)))
    if origin is not None:
        v["origin"] = origin
    if data:
        v["data"] = data
    return msgpack.packb(v)


def clock(round: int, started: float, shards: int = 1) -> bytes:
    return msgpack.packb({"k": "c", "round": round, "started": started, **({"shards": shards} if shards > 1 else {})})


# msgpack type bytes (the format's spec): what the bounded readers below look at before unpacking anything
_MAPS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ARRAYS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_STRS = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}
_BINS = frozenset({0xC4, 0xC5, 0xC6})


class _Reader:
    """msgpack read one object at a time, each looked at (its type byte) before it is built: a reader of
    network input that never builds more objects than its caller allows, however the bytes nest."""

    def __init__(self, data: bytes, *, max_bin: int, max_str: int):
        self.data = data
        self.u = msgpack.Unpacker(raw=False, max_buffer_size=max(1, len(data)), max_bin_len=max_bin,
                                  max_str_len=max_str, max_array_len=MAX_ITEMS, max_map_len=MAX_FIELDS,
                                  max_ext_len=0)
        self.u.feed(data)

    def next_type(self) -> int:
        pos = self.u.tell()
        return self.data[pos] if pos < len(self.data) else -1

    def header(self, kinds: frozenset, limit: int, what: str) -> int:
        t = self.next_type()
        if t not in kinds:
            raise V.Invalid(what, "unexpected type")
        n = self.u.read_map_header() if kinds is _MAPS else self.u.read_array_header()  # (these take no limit)
        if n > limit:
            raise V.Invalid(what, f"{n} entries", "too_large")
        return n

    def scalar(self, what: str, kinds: frozenset | None = None) -> Any:
        t = self.next_type()
        if t in _MAPS or t in _ARRAYS or (kinds is not None and t not in kinds):
            raise V.Invalid(what, "unexpected type")
        return self.u.unpack()

    def done(self, what: str) -> None:
        if self.u.tell() != len(self.data):
            raise V.Invalid(what, "trailing bytes")


def unpack_message(data: bytes, *, big: str = "data", max_big: int = MAX_INLINE) -> dict[str, Any]:
    """A topic message's map: at most MAX_FIELDS string keys, each value plain data at most one list or map
    (of at most MAX_ITEMS scalars) deep; only `big` may be longer than MAX_MESSAGE bytes (up to `max_big`).
    Every object is checked before it is built, so that a message costs what its size says whatever it
    nests (an unbounded unpack of `[[]] * 21000` took 100 times an honest message's time). V.Invalid
    (reason "too_large" or "malformed") for anything else; never any other exception."""
    if len(data) > max(MAX_MESSAGE, max_big):
        raise V.Invalid("message", f"{len(data)} bytes", "too_large")
    try:
        r = _Reader(data, max_bin=max(MAX_MESSAGE, max_big), max_str=MAX_MESSAGE)
        out: dict[str, Any] = {}
        for _ in range(r.header(_MAPS, MAX_FIELDS, "message")):
            key = r.scalar("message key", _STRS)
            t = r.next_type()
            if t in _MAPS:
                out[key] = {r.scalar(key, _STRS): r.scalar(key) for _ in range(r.header(_MAPS, MAX_ITEMS, key))}
            elif t in _ARRAYS:
                out[key] = [r.scalar(key) for _ in range(r.header(_ARRAYS, MAX_ITEMS, key))]
            else:
                out[key] = r.scalar(key)
        r.done("message")
    except V.Invalid:
        raise
    except Exception as e:  # noqa: BLE001 - any bytes at all may arrive
        raise V.Invalid("message", f"not msgpack ({type(e).__name__})") from None
    V.plain(out, "message", 2, blobs=True)
    blob = out.get(big)
    rest = len(data) - (len(blob) if type(blob) is bytes else 0)
    if rest > MAX_MESSAGE:  # everything but the batch is a small message's
        raise V.Invalid("message", f"{rest} bytes beside the batch", "too_large")
    return out


def parse(author: str, data: bytes, now: float | None = None) -> tuple[str, Any]:
    """(kind, record) of a message's bytes; V.Invalid (reason "too_large" or "malformed") for anything else."""
    now = time.time() if now is None else now
    v = unpack_message(data)
    kind = V.field(v, "k", V.choice, ("h", "a", "c"))
    if kind != "a" and len(data) > MAX_MESSAGE:
        raise V.Invalid("message", f"{len(data)} bytes", "too_large")
    if kind == "h":
        m = records.member(author, v, now + MEMBER_TTL, now)
        if m.time < now - MEMBER_TTL:  # an old heartbeat handed on again says nothing about now
            raise V.Invalid("time", "stale heartbeat", "stale")
        m.expires = m.time + MEMBER_TTL
        return kind, m
    if kind == "c":
        c = records.clock(author, v, now + 60.0, now)
        c.shards = V.field(v, "shards", V.integer, 1, MAX_SHARDS + 1, default=1)
        return kind, c
    a = records.announcement(author, v, now + 60.0, now)
    a.round = V.field(v, "round", V.integer, 0)
    a.stage = V.field(v, "stage", V.integer, 0)
    a.groups = V.field(v, "groups", V.integer, 0, default=0)
    a.signal = min(V.field(v, "signal", V.integer, 0, default=0), a.groups)
    origin = V.field(v, "origin", V.peer_id, default=None)
    if origin == author:
        origin = None
    a.origin = origin
    a.data = V.field(v, "data", V.blob, a.size, default=b"") if "data" in v else b""
    if a.data and hashlib.sha256(a.data).digest() != a.digest:
        raise V.Invalid("data", "does not match the digest")
    if not a.data and len(data) > MAX_MESSAGE:
        raise V.Invalid("message", f"{len(data)} bytes without a batch", "too_large")
    if "role" in v and origin is None:  # its author's heartbeat, carried along: checked like one
        m = records.member(author, {**v, "time": v["created"]}, now + MEMBER_TTL, now)
        if m.time >= now - MEMBER_TTL:  # an old announcement handed on (catch-up) says nothing about now
            m.expires = m.time + MEMBER_TTL
            a.member = m
    return kind, a


# ---- what this node heard ----------------------------------------------------------------------------------
@dataclass
class Heard:
    """One author's accounting: its rate buckets."""

    msgs: Bucket = field(default_factory=lambda: Bucket(RATE, BURST))
    bytes: Bucket = field(default_factory=lambda: Bucket(BYTE_RATE, BYTE_BURST))


HeldKey = tuple[int, int, str, str]  # (round, stage, announcer, origin or "")


class Book:
    """The topic as this node heard it: live members, announcements by (round, stage), the clocks; filled by
    `handle` (the subscription's handler, and catch-up replies), read by the transport and the round clock
    on the node's event loop.

    `handle` never raises. It drops, counting each by reason in `drops` and calling `blame(author, reason)`
    for an authenticated author: a message over its size cap (`too_large`), past its author's rate
    (`over_rate`), with a bad signature (`bad_signature`, blamed on whoever handed it over, since `from`
    is then unproven), signed for another topic (`wrong_topic`, blamed the same way), or whose fields do not
    parse (`malformed`); stale heartbeats and repeats are dropped uncounted as offenses, and so is what
    nobody in particular is to blame for: messages of unknown authors past their shared budget (`busy`),
    announcements too far ahead of this node's reference (`ahead`), and what a full table gives up
    (`evicted`). Own messages come back through the subscription and are handled like any other, uncapped.
    `changed` is set whenever an announcement is added.

    `trusted`: the authors whose clock this node follows (its initial peers; DHTCoordinator adds its set
    through clock_rounds / clock_shards) besides itself. Announcements are kept from KEEP_ROUNDS before the
    round this node plays (`playing`; a node that plays none, like the bootstrap: the trusted clock) to
    AHEAD_ROUNDS past the further of the two (`reference`); with neither known yet, only the table's caps
    apply."""

    def __init__(self, me: str, topic: str, *, blame: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, trusted: Iterable[str] = ()):
        self.me = me
        self.topic = topic
        self.blame = blame
        self.mono = clock
        self.drops: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()  # messages taken, by kind
        self.bytes_in = 0
        self.members: dict[str, records.Member] = {}  # in the order last written (the oldest first)
        self.raw_heartbeats: dict[str, pb.PSMessage] = {}
        self.clocks: dict[str, records.Clock] = {}  # trusted authors', and at most MAX_UNTRUSTED_CLOCKS others'
        self.raw_clocks: dict[str, pb.PSMessage] = {}  # trusted authors' only: what catch-up replies hand on
        self._untrusted: Recent = Recent(MAX_UNTRUSTED_CLOCKS)  # author -> its last raw clock message
        self.announced: dict[tuple[int, int], dict[tuple[str, str], tuple[records.Announcement, pb.PSMessage]]] = {}
        self._held: OrderedDict[HeldKey, int] = OrderedDict()  # every held announcement, oldest first: its bytes
        self.held_bytes = 0
        self._in_slot: Counter[tuple[int, int, str]] = Counter()  # announcements of (round, stage) by announcer
        self.slots_by: dict[str, set[tuple[int, int]]] = {}  # (round, stage) slots each announcer holds
        self.heard: Recent = Recent(MAX_AUTHORS)
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.changed = asyncio.Event()
        self.floor = -1  # announcements of earlier rounds are not kept
        self.position = -1  # the round this node plays (playing)
        self.clock_round = -1  # the furthest trusted clock
        self.trusted: set[str] = {me}
        self._trust_asked: frozenset[str] = frozenset()  # set from other threads, applied on the loop
        self.vouched: set[str] = set()  # authors that delivered a valid batch here (the transport says: vouch)
        self.known: set[str] = {me}  # trusted | vouched: never evicted first, not under the shared budget
        self._known_raw: set[bytes] = set()  # the same as `from` bytes, for the subscription's queue
        self._raw_ids: dict[str, bytes] = {}  # peer id -> its bytes, for those (converted once)
        self.unknown_msgs = Bucket(UNKNOWN_RATE, UNKNOWN_BURST)
        self.unknown_bytes = Bucket(UNKNOWN_BYTE_RATE, UNKNOWN_BYTE_BURST)
        self.gate = StreamGate(MAX_CATCHUP_SERVING, CATCHUP_RATE, CATCHUP_BURST)  # who is served catch-ups
        self._pruned_at = float("-inf")
        self._trust(trusted)
        self._refresh_known()

    # ---- trust --------------------------------------------------------------------------------------
    def _trust(self, peers: Iterable[str]) -> None:
        """Follow the clocks of `peers` too (at most MAX_TRUSTED in all); on the event loop."""
        added = False
        for p in peers:
            if len(self.trusted) >= MAX_TRUSTED + 1:
                break
            if type(p) is str and p and p not in self.trusted:
                self.trusted.add(p)
                added = True
                raw = self._untrusted.pop(p, None)
                if raw is not None and p in self.clocks:  # heard before it was trusted: followed now
                    self.raw_clocks[p] = raw
                    self._clock_moved(self.clocks[p].round)
        if added:
            self._refresh_known()

    def _apply_trust(self) -> None:
        asked = self._trust_asked
        if asked and not asked <= self.trusted:
            self._trust(asked)

    def ask_trust(self, peers: Iterable[str]) -> None:
        """What a reader of the clock trusts (any thread): taken in on the event loop, at the next message."""
        peers = frozenset(peers)
        if not peers <= self.trusted and peers != self._trust_asked:
            self._trust_asked = peers

    def vouch(self, peers: Iterable[str]) -> None:
        """The authors that delivered valid batches here (the transport, after a collect): their messages are
        served first and never under the shared budget of unknown authors; on the event loop."""
        vouched = set()
        for p in peers:
            if len(vouched) >= MAX_PEERS:
                break
            vouched.add(p)
        if vouched != self.vouched:
            self.vouched = vouched
            self._refresh_known()

    def _refresh_known(self) -> None:
        from hivemind.p2p import PeerID

        self.known = self.trusted | self.vouched
        ids = {}
        for p in self.known:
            b = self._raw_ids.get(p)
            if b is None:
                try:
                    b = PeerID.from_base58(p).to_bytes()
                except Exception:  # noqa: BLE001 - not a peer id: nothing to match
                    continue
            ids[p] = b
        self._raw_ids = ids  # as bounded as `known`
        self._known_raw = set(ids.values())

    def priority(self, msg: pb.PSMessage) -> bool:
        """Whether `msg`'s author is known here (the subscription keeps its messages first when it must drop)."""
        return bytes(getattr(msg, "from")) in self._known_raw

    # ---- the reference round -----------------------------------------------------------------------------
    @property
    def reference(self) -> int:
        """The round announcements may be AHEAD_ROUNDS past: the furthest of the trusted clock and the round
        this node plays (-1: neither known)."""
        return max(self.position, self.clock_round)

    def playing(self, round: int) -> None:
        """This node plays `round` now (the transport, at each collect): what is KEEP_ROUNDS older goes."""
        if round > self.position:
            self.position = round
            self.forget_before(round - KEEP_ROUNDS)

    def _clock_moved(self, round: int) -> None:
        """A trusted clock says `round`: a node that plays no rounds (a bootstrap peer, the keeper) forgets
        what is KEEP_ROUNDS older; one that plays keeps what it may still collect (a slow peer may be behind)."""
        if round > self.clock_round:
            self.clock_round = round
            if self.position < 0:
                self.forget_before(round - KEEP_ROUNDS)

    # ---- taking messages -------------------------------------------------------------------------------
    def handle(self, msg: pb.PSMessage, *, via: str | None = None) -> str | None:
        """Take one message (from the topic, or handed over by `via` in a catch-up reply); its kind or None."""
        try:
            return self._handle(msg, via)
        except Exception as e:  # noqa: BLE001 - a last line: network input never raises into the node
            self._drop(None, "malformed", f"{type(e).__name__}")
            return None

    def _admit(self, author: str, size: int) -> bool:
        """A topic message of `author` (the daemon checked its signature) within its rate, and within the shared
        budget when its author is not known here; before anything costly is done with it."""
        if size > MAX_INLINE:
            self._drop(author, "too_large", f"{size} bytes")
            return False
        heard = self.heard.get(author)
        if heard is None:
            heard = Heard()
        self.heard[author] = heard  # the newest: the least recently heard are forgotten first
        now = self.mono()
        if not heard.msgs.take(1, now) or not heard.bytes.take(size, now):
            self._drop(author, "over_rate", f"{size} bytes")
            return False
        if author not in self.known and (not self.unknown_msgs.take(1, now) or not self.unknown_bytes.take(size, now)):
            self._drop(None, "busy", f"{size} bytes from {author[-8:]}")  # nobody in particular to blame
            return False
        return True

    def _handle(self, msg: pb.PSMessage, via: str | None) -> str | None:
        self._apply_trust()
        size = len(msg.data)
        topics = list(msg.topicIDs)
        if len(topics) != 1 or not is_swarm_topic(topics[0], self.topic):  # another swarm's, replayed here
            self._drop(via, "wrong_topic", V.clip(list(msg.topicIDs)))
            return None
        if via is None:  # the daemon verified a topic message's author: its caps come before any work
            claimed = author_of(msg)
            if claimed is not None and claimed != self.me and not self._admit(claimed, size):
                return None
        author = verify_message(msg)
        if author is None:
            self._drop(via, "bad_signature", "signature does not hold")
            return None
        key = (author, bytes(msg.seqno))
        if key in self._seen:
            return None
        self._seen[key] = None
        if len(self._seen) > 50_000:
            self._seen.popitem(last=False)
        if author != self.me and size > MAX_INLINE:  # a catch-up reply is bounded by its request; still capped
            self._drop(author, "too_large", f"{size} bytes")
            return None
        try:
            kind, rec = parse(author, bytes(msg.data))
        except V.Invalid as e:
            if e.reason == "stale":
                return None
            self._drop(author, e.reason if e.reason in ("too_large",) else "malformed", str(e))
            return None
        if kind != "c" and topics[0] != self.topic:  # a shard's topic: only its own peers speak there
            shards, shard = (int(x) for x in topics[0].rpartition("/s")[2].split("."))
            if shard_of(author, shards) != shard:
                self._drop(author, "wrong_shard", f"{author[-8:]} in shard {shard} of {shards}")
                return None
        self.bytes_in += size
        self.handled[kind] += 1
        if kind == "h":
            self._member(rec, msg)
        elif kind == "c":
            self._clock(rec, msg)
        else:
            self._announce(rec, msg)
        return kind

    def _clock(self, c: records.Clock, msg: pb.PSMessage) -> None:
        """A trusted author's clock is followed and handed on; another's is held (at most MAX_UNTRUSTED_CLOCKS
        of them, the least recently heard forgotten first) only in case it is trusted later, and never handed
        on: invented identities cannot grow the table or crowd catch-up replies."""
        author = c.peer_id
        old = self.clocks.get(author)
        if old is not None and c.round < old.round:
            return
        if author in self.trusted:
            self.clocks[author] = c
            self.raw_clocks[author] = msg
            self._clock_moved(c.round)
            return
        self._untrusted[author] = msg
        self.clocks[author] = c
        for p in [p for p in self.clocks if p not in self.trusted and p not in self._untrusted]:
            del self.clocks[p]  # pushed out of the few untrusted ones held

    def _member(self, m: records.Member, msg: pb.PSMessage | None) -> None:
        """The newest heartbeat of its author wins; `msg` (a heartbeat, or an announcement that carries one)
        is what a catch-up reply hands on (None: keep handing on the last one)."""
        old = self.members.get(m.peer_id)
        if old is None or m.time >= old.time:
            self.members.pop(m.peer_id, None)  # written again: the newest
            self.members[m.peer_id] = m
            if msg is not None:
                self.raw_heartbeats[m.peer_id] = msg
            if len(self.members) > MAX_MEMBERS:
                self._evict_members()

    def _evict_members(self) -> None:
        """Down to 7/8 of MAX_MEMBERS (one pass for many additions): the long quiet first, then the least
        recently heard of the authors this node does not know, then (all known) the least recently heard."""
        self._prune_members(time.time(), force=True)
        target = MAX_MEMBERS * 7 // 8
        for p in [p for p in self.members if p not in self.known][:max(0, len(self.members) - target)]:
            self._forget_member(p)
        while len(self.members) > MAX_MEMBERS:
            self._forget_member(next(iter(self.members)))

    def _forget_member(self, p: str) -> None:
        self.members.pop(p, None)
        self.raw_heartbeats.pop(p, None)

    def _prune_members(self, now: float, force: bool = False) -> None:
        if not force and self.mono() - self._pruned_at < 1.0:  # at most once a second: the table is walked
            return
        self._pruned_at = self.mono()
        for p in [p for p, m in self.members.items() if m.expires < now - MEMBER_FORGET]:
            self._forget_member(p)

    def _announce(self, a: records.Announcement, msg: pb.PSMessage) -> None:
        inline = bool(a.data)
        if a.member is not None:  # the slot rules below bound announcements, not what a peer says of itself
            # One with its batch inline (up to 64 KiB) is not handed on as a heartbeat: every catch-up reply
            # would carry it, for every such member.
            self._member(a.member, None if inline else msg)
        if a.round < self.floor:
            return
        ref = self.reference
        if ref >= 0 and a.round > ref + AHEAD_ROUNDS:
            # Bounded by the reference, not by "the newest round seen": that would let one peer announce round
            # 2**31-1 and make everyone forget the real ones.
            self.drops["gossip_ahead"] += 1
            return
        slot = self.announced.get((a.round, a.stage))
        key = (a.peer_id, a.origin or "")
        if slot is not None and key in slot:  # the mid-round re-publish, or a catch-up copy: one per author and slot
            return
        if a.origin is not None and slot is not None and len(slot) > 4 * CATCHUP_MAX + 1024:
            return  # relays of invented identities cannot grow this without bound
        if a.origin is not None and slot is not None and \
                sum(1 for p, o in slot if p == a.peer_id and o) >= self.relay_cap(a.peer_id):
            # More origins than its author bridges (or than any bridge may): invented identities, refused as
            # they come, so that they neither fill the book nor crowd catch-up replies, whoever collects when.
            self._drop(a.peer_id, "relay_limit", f"over {self.relay_cap(a.peer_id)} relayed origins in a slot")
            return
        if not self._make_room(a.peer_id, (a.round, a.stage)):
            return
        if inline:
            a.data = b""  # held once: in the signed message it came in (inline_data reads it from there)
        self._hold((a.round, a.stage, *key), a, msg)
        member = self.members.get(a.peer_id)
        if member is not None and a.origin is None:  # an announcer is live whatever its last heartbeat
            member.expires = max(member.expires, time.time() + MEMBER_TTL)
        self.changed.set()

    def _make_room(self, author: str, slot: tuple[int, int]) -> bool:
        """Whether `author` may hold an announcement in `slot`: within MAX_SLOTS_PER_AUTHOR slots, its oldest
        slot giving way (an honest peer's rounds move on; one that claims far rounds only crowds itself),
        unless the new one is older than all it holds."""
        held = self.slots_by.get(author)
        if held is None or slot in held or len(held) < MAX_SLOTS_PER_AUTHOR:
            return True
        oldest = min(held)
        if slot < oldest:
            return False
        for k in [k for k in self.announced.get(oldest, {}) if k[0] == author]:
            self._remove((*oldest, *k))
        held.discard(oldest)  # also when the book was changed under it
        return True

    def _hold(self, hk: HeldKey, a: records.Announcement, msg: pb.PSMessage) -> None:
        if hk in self._held:  # accounting of an entry taken out behind the book's back
            self._remove(hk)
        slot = self.announced.setdefault(hk[:2], {})
        slot[hk[2:]] = (a, msg)
        size = len(msg.data) + HELD_OVERHEAD
        self._held[hk] = size
        self.held_bytes += size
        self._in_slot[hk[:3]] += 1
        self.slots_by.setdefault(hk[2], set()).add(hk[:2])
        if len(self._held) > MAX_ANNOUNCED or self.held_bytes > MAX_ANNOUNCED_BYTES:
            self._evict()

    def _remove(self, hk: HeldKey) -> None:
        size = self._held.pop(hk, None)
        if size is not None:
            self.held_bytes -= size
        slot = self.announced.get(hk[:2])
        if slot is not None:
            slot.pop(hk[2:], None)
            if not slot:
                del self.announced[hk[:2]]
        n = self._in_slot.get(hk[:3], 0) - 1
        if n > 0:
            self._in_slot[hk[:3]] = n
            return
        self._in_slot.pop(hk[:3], None)
        slots = self.slots_by.get(hk[2])
        if slots is not None:
            slots.discard(hk[:2])
            if not slots:
                del self.slots_by[hk[2]]

    def _evict(self) -> None:
        """Back to 7/8 of MAX_ANNOUNCED and MAX_ANNOUNCED_BYTES (one pass for many additions): the oldest
        announcements of authors this node does not know first, then the oldest of any."""
        n, b = MAX_ANNOUNCED * 7 // 8, MAX_ANNOUNCED_BYTES * 7 // 8

        def over() -> bool:
            return len(self._held) > n or self.held_bytes > b

        for hk in list(self._held):
            if not over():
                break
            if hk[2] not in self.known:
                self._remove(hk)
                self.drops["gossip_evicted"] += 1
        while over() and self._held:
            self._remove(next(iter(self._held)))
            self.drops["gossip_evicted"] += 1

    def inline_data(self, a: records.Announcement) -> bytes:
        """The batch that came inside `a`'s announcement (b"": none, or no longer held), digest checked."""
        held = self.announced.get((a.round, a.stage), {}).get((a.peer_id, a.origin or ""))
        if held is None:
            return b""
        try:
            data = unpack_message(bytes(held[1].data)).get("data", b"")
        except V.Invalid:
            return b""
        return data if type(data) is bytes and data and hashlib.sha256(data).digest() == a.digest else b""

    def relay_cap(self, author: str) -> int:
        """Distinct origins `author` may relay per slot: the peers its heartbeat says it bridges (at most
        MAX_RELAYED_ORIGINS); MAX_RELAYED_ORIGINS while its heartbeat is not known yet (the collect applies
        the declared count again)."""
        m = self.members.get(author)
        return MAX_RELAYED_ORIGINS if m is None else max(1, min(m.bridged, MAX_RELAYED_ORIGINS))

    def _drop(self, author: str | None, reason: str, why: str) -> None:
        self.drops[f"gossip_{reason}"] += 1
        log.debug("dropped a gossip message (%s) from %s: %s", reason, (author or "?")[-8:], V.clip(why, 120))
        if author is not None and self.blame is not None:
            try:
                self.blame(author, reason)
            except Exception as e:  # noqa: BLE001 - accounting must not stop the reader
                log.debug("blame: %s", e)

    def forget_before(self, round: int) -> None:
        """Drop the announcements of rounds before `round` and refuse any that come later (the reference moves
        it: playing, a trusted clock)."""
        if round <= self.floor:
            return
        self.floor = round
        for hk in [hk for hk in self._held if hk[0] < round]:
            self._remove(hk)
        for slot in [k for k in self.announced if k[0] < round]:  # whatever is left of a book changed under it
            for k in list(self.announced.get(slot, {})):
                self._remove((*slot, *k))
            self.announced.pop(slot, None)

    # ---- reading ----------------------------------------------------------------------------------------
    def live_members(self, now: float | None = None) -> dict[str, records.Member]:
        """Members whose last heartbeat (or announcement) is younger than MEMBER_TTL and who did not leave."""
        now = time.time() if now is None else now
        self._prune_members(now)
        return {p: m for p, m in self.members.items() if m.expires >= now and not m.left}

    def announcements(self, round: int, stage: int) -> list[records.Announcement]:
        return [a for a, _ in self.announced.get((round, stage), {}).values()]

    def clock_rounds(self, trusted: set[str]) -> list[int]:
        self.ask_trust(trusted)
        return [c.round for p, c in list(self.clocks.items()) if p in trusted]

    def clock_shards(self, trusted: set[str]) -> int | None:
        """The topic shards the furthest trusted clock says (None: no trusted clock heard)."""
        self.ask_trust(trusted)
        clocks = [c for p, c in list(self.clocks.items()) if p in trusted]
        return max(clocks, key=lambda c: (c.round, c.started)).shards if clocks else None

    def catch_up_reply(self, round: int, stage: int, rng: random.Random) -> list[pb.PSMessage]:
        """What this node heard that a late joiner needs, at most CATCHUP_MAX_ITEMS messages (what
        decode_reply takes) and CATCHUP_REPLY_BYTES: the trusted clocks, at most CATCHUP_MAX announcements of
        (round, stage) drawn at random, and the live members' heartbeats, those of known authors first, then
        a random sample of the others."""
        out = list(self.raw_clocks.values())[:MAX_TRUSTED + 1]
        slot = list(self.announced.get((round, stage), {}).values())
        out += [msg for _, msg in rng.sample(slot, min(CATCHUP_MAX, len(slot)))]
        held = {id(m) for m in out}  # a member's last heartbeat may be this slot's announcement itself
        live = self.live_members()
        beats = [(p, m) for p, m in self.raw_heartbeats.items() if p in live and id(m) not in held]
        known = [m for p, m in beats if p in self.known]
        others = [m for p, m in beats if p not in self.known]
        room = CATCHUP_MAX_ITEMS - len(out)
        out += known[:max(0, room)]
        room = CATCHUP_MAX_ITEMS - len(out)
        out += rng.sample(others, max(0, min(room, len(others))))
        kept, total = [], 0
        for m in out[:CATCHUP_MAX_ITEMS]:
            size = len(m.data) + 200
            if total + size <= CATCHUP_REPLY_BYTES:  # one that does not fit is left out, smaller ones still go
                kept.append(m)
                total += size
        return kept


# ---- catch-up over a stream -----------------------------------------------------------------------------------
_HEADER = 8
MAX_CATCHUP_REQUEST = 64
MAX_TOPIC = 1024  # bytes of a topic name in a reply
_MAX_ID = 128  # bytes of a message's `from`, `seqno` or `signature` in a reply (real ones: 38, 8, 64)


def encode_reply(msgs: list[pb.PSMessage]) -> bytes:
    return msgpack.packb([[bytes(getattr(m, "from")), bytes(m.data), bytes(m.seqno), list(m.topicIDs),
                           bytes(m.signature)] for m in msgs])


def decode_reply(data: bytes, max_items: int = CATCHUP_MAX_ITEMS) -> list[pb.PSMessage]:
    """The messages of a catch-up reply (at most `max_items`, what catch_up_reply builds); V.Invalid when it
    is not one. Read one object at a time, each checked before it is built (a list of five: three short
    byte strings, the message, its topic), so a hostile reply costs what its item count allows. Their
    signatures are checked by Book.handle like the topic's."""
    out = []
    try:
        r = _Reader(data, max_bin=MAX_INLINE, max_str=MAX_TOPIC)
        for _ in range(r.header(_ARRAYS, max_items, "catch-up reply")):
            if r.header(_ARRAYS, 5, "catch-up item") != 5:
                raise V.Invalid("catch-up reply", "not a message")
            frm, body, seqno = (r.scalar("catch-up item", _BINS) for _ in range(3))
            topics = [r.scalar("topic", _STRS) for _ in range(r.header(_ARRAYS, 4, "topics"))]
            signature = r.scalar("catch-up item", _BINS)
            if max(len(frm), len(seqno), len(signature)) > _MAX_ID:
                raise V.Invalid("catch-up reply", "not a message")
            m = pb.PSMessage(data=body, seqno=seqno, signature=signature)
            setattr(m, "from", frm)
            m.topicIDs.extend(topics)
            out.append(m)
        r.done("catch-up reply")
    except V.Invalid:
        raise
    except Exception as e:  # noqa: BLE001 - any bytes at all may arrive
        raise V.Invalid("catch-up reply", f"not a list of messages ({type(e).__name__})") from None
    return out


def parse_catchup_request(data: Any) -> tuple[int, int] | None:
    """(round, stage) of a catch-up request (round -1: no announcements, members and clock only); None for
    anything else."""
    try:
        if type(data) is not bytes or len(data) > MAX_CATCHUP_REQUEST:
            return None
        req = msgpack.unpackb(data, raw=False)
        if type(req) is not list or len(req) != 2:
            return None
        return V.integer(req[0], "round", -1), V.integer(req[1], "stage", 0)
    except Exception:  # noqa: BLE001 - whatever the bytes, not a request
        return None


async def serve_catchup(book: Book, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        rng: random.Random, requester: str = "") -> None:
    """Answer one catch-up request of `requester` (the stream's authenticated peer id), within book.gate: at
    most MAX_CATCHUP_SERVING at once, CATCHUP_RATE a second per requester, the request read and the reply
    sent each under one deadline."""
    gate = book.gate
    if not gate.admit(requester):
        writer.close()
        return
    try:
        raw = await read_request(reader, MAX_CATCHUP_REQUEST)
        req = None if raw is None else parse_catchup_request(raw)
        if req is None:
            return
        reply = encode_reply(book.catch_up_reply(*req, rng))
        try:
            await send_within(writer, reply, timeout=gate.send_timeout, rate=gate.send_rate)
        except asyncio.TimeoutError:
            gate.drops["send_timeout"] += 1
            return
        await asyncio.wait_for(reader.read(1), READ_TIMEOUT)  # the asker closes first (see PayloadServer.handle)
    except Exception as e:  # noqa: BLE001 - a broken or hostile asker: nothing to answer
        log.debug("catch-up request ended: %s", type(e).__name__)
    finally:
        gate.release()
        writer.close()


async def ask_catchup(p2p: Any, peer: str, round: int, stage: int, timeout: float = 5.0) -> list[pb.PSMessage]:
    """The messages `peer` holds for (round, stage) (see Book.catch_up_reply); [] when it cannot be had."""
    from hivemind.p2p import PeerID

    async def go() -> list[pb.PSMessage]:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), CATCHUP)
        try:
            req = msgpack.packb([round, stage])
            writer.write(len(req).to_bytes(_HEADER, "big") + req)
            await writer.drain()
            n = int.from_bytes(await reader.readexactly(_HEADER), "big")
            if n > CATCHUP_REPLY_BYTES + 65536:
                raise V.Invalid("catch-up reply", f"{n} bytes", "too_large")
            return decode_reply(await reader.readexactly(n))
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except Exception as e:  # noqa: BLE001 - a peer that cannot or will not answer: ask another
        log.debug("catch-up from %s: %s", peer[-8:], type(e).__name__)
        return []

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
from typing import Any, Callable

import msgpack
from hivemind.proto import p2pd_pb2 as pb

from p2pswarm import validate as V
from p2pswarm.comm.core import MAX_RELAYED_ORIGINS
from p2pswarm.comm.hivemind import records
from p2pswarm.comm.hivemind.pubsub import verify_message

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024  # a heartbeat, announcement or clock (real ones: 150-300 bytes)
MAX_INLINE = 64 * 1024  # an announcement that carries its batch; the daemon silently drops anything over 1 MiB
RATE, BURST = 8.0, 96.0  # messages per second per author, and the burst (a bridge announces its relays at once)
BYTE_RATE, BYTE_BURST = 48 * 1024.0, 384 * 1024.0  # bytes per second per author, and the burst
MEMBER_TTL = 15.0  # a peer is live while its last heartbeat is younger than this
MEMBER_REFRESH = 5.0  # a heartbeat goes out when its author published nothing with its fields for this long
CLOCK_REFRESH = 5.0
KEEP_ROUNDS = 4  # rounds of announcements remembered before the one played (and served to catch-up requests)
MAX_SLOTS_PER_AUTHOR = 64  # (round, stage) slots one author's announcements may occupy at once
CATCHUP = "p2pswarm.catchup/1"
CATCHUP_MAX = 64  # announcements per reply, drawn at random among those held
CATCHUP_REPLY_BYTES = 512 * 1024
MAX_AUTHORS = 100_000  # bounds the memory of per-author state (rate buckets, members)


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


def parse(author: str, data: bytes, now: float | None = None) -> tuple[str, Any]:
    """(kind, record) of a message's bytes; V.Invalid (reason "too_large" or "malformed") for anything else."""
    now = time.time() if now is None else now
    if len(data) > MAX_INLINE:
        raise V.Invalid("message", f"{len(data)} bytes", "too_large")
    try:
        v = msgpack.unpackb(data, raw=False)
    except Exception as e:  # noqa: BLE001 - any bytes at all may arrive
        raise V.Invalid("message", f"not msgpack ({type(e).__name__})") from None
    V.plain(V.mapping(v, "message"), "message", 2, blobs=True)
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
class Bucket:
    """A token bucket: `rate` per second, at most `burst`."""

    rate: float
    burst: float
    level: float = -1.0
    at: float = 0.0

    def take(self, n: float, now: float) -> bool:
        if self.level < 0:
            self.level, self.at = self.burst, now
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < n:
            return False
        self.level -= n
        return True


@dataclass
class Heard:
    """One author's accounting: its rate buckets and the seqnos of its messages already handled."""

    msgs: Bucket = field(default_factory=lambda: Bucket(RATE, BURST))
    bytes: Bucket = field(default_factory=lambda: Bucket(BYTE_RATE, BYTE_BURST))


class Book:
    """The topic as this node heard it: live members, announcements by (round, stage), the clocks; filled by
    `handle` (the subscription's handler, and catch-up replies), read by the transport and the round clock
    on the node's event loop.

    `handle` never raises. It drops, counting each by reason in `drops` and calling `blame(author, reason)`
    for an authenticated author: a message over its size cap (`too_large`), past its author's rate
    (`over_rate`), with a bad signature (`bad_signature`, blamed on whoever handed it over, since `from`
    is then unproven), signed for another topic (`wrong_topic`, blamed the same way), or whose fields do not
    parse (`malformed`); stale heartbeats and repeats are dropped
    uncounted as offenses. Own messages come back through the subscription and are handled like any other,
    uncapped. `changed` is set whenever an announcement is added."""

    def __init__(self, me: str, topic: str, *, blame: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.me = me
        self.topic = topic
        self.blame = blame
        self.mono = clock
        self.drops: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()  # messages taken, by kind
        self.bytes_in = 0
        self.members: dict[str, records.Member] = {}
        self.raw_heartbeats: dict[str, pb.PSMessage] = {}
        self.clocks: dict[str, records.Clock] = {}
        self.raw_clocks: dict[str, pb.PSMessage] = {}
        self.announced: dict[tuple[int, int], dict[tuple[str, str], tuple[records.Announcement, pb.PSMessage]]] = {}
        self.heard: OrderedDict[str, Heard] = OrderedDict()
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.changed = asyncio.Event()
        self.floor = -1  # announcements of earlier rounds are not kept
        self.slots_by: Counter[str] = Counter()  # (round, stage) slots each author holds announcements in

    def handle(self, msg: pb.PSMessage, *, via: str | None = None) -> str | None:
        """Take one message (from the topic, or handed over by `via` in a catch-up reply); its kind or None."""
        try:
            return self._handle(msg, via)
        except Exception as e:  # noqa: BLE001 - a last line: network input never raises into the node
            self._drop(None, "malformed", f"{type(e).__name__}")
            return None

    def _handle(self, msg: pb.PSMessage, via: str | None) -> str | None:
        size = len(msg.data)
        topics = list(msg.topicIDs)
        if len(topics) != 1 or not is_swarm_topic(topics[0], self.topic):  # another swarm's, replayed here
            self._drop(via, "wrong_topic", V.clip(list(msg.topicIDs)))
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
        if author != self.me:
            if size > MAX_INLINE:
                self._drop(author, "too_large", f"{size} bytes")
                return None
            if via is None:  # a catch-up reply is bounded by its request; the topic is not
                heard = self.heard.get(author)
                if heard is None:
                    heard = self.heard[author] = Heard()
                    if len(self.heard) > MAX_AUTHORS:
                        self.heard.popitem(last=False)
                now = self.mono()
                if not heard.msgs.take(1, now) or not heard.bytes.take(size, now):
                    self._drop(author, "over_rate", f"{size} bytes")
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
            old = self.clocks.get(author)
            if old is None or rec.round >= old.round:
                self.clocks[author] = rec
                self.raw_clocks[author] = msg
        else:
            self._announce(rec, msg)
        return kind

    def _member(self, m: records.Member, msg: pb.PSMessage | None) -> None:
        """The newest heartbeat of its author wins; `msg` (a heartbeat, or an announcement that carries one)
        is what a catch-up reply hands on (None: keep handing on the last one)."""
        old = self.members.get(m.peer_id)
        if old is None or m.time >= old.time:
            self.members[m.peer_id] = m
            if msg is not None:
                self.raw_heartbeats[m.peer_id] = msg

    def _announce(self, a: records.Announcement, msg: pb.PSMessage) -> None:
        if a.member is not None:  # the slot rules below bound announcements, not what a peer says of itself
            # One with its batch inline (up to 64 KiB) is not handed on as a heartbeat: every catch-up reply
            # would carry it, for every such member.
            self._member(a.member, None if a.data else msg)
        if a.round < self.floor:
            return
        slot = self.announced.get((a.round, a.stage))
        key = (a.peer_id, a.origin or "")
        if slot is not None and key in slot:  # the mid-round re-publish, or a catch-up copy: one per author and slot
            return
        # Bounded by author, not by round: "the newest round seen" would let one peer announce round 2**31-1
        # and make everyone forget the real ones.
        if slot is None or not any(k[0] == a.peer_id for k in slot):
            if self.slots_by[a.peer_id] >= MAX_SLOTS_PER_AUTHOR:
                return
            self.slots_by[a.peer_id] += 1
        if slot is None:
            slot = self.announced[(a.round, a.stage)] = {}
        if a.origin is not None and len(slot) > 4 * CATCHUP_MAX + 1024:
            return  # relays of invented identities cannot grow this without bound
        if a.origin is not None and sum(1 for p, o in slot if p == a.peer_id and o) >= self.relay_cap(a.peer_id):
            # More origins than its author bridges (or than any bridge may): invented identities, refused as
            # they come, so that they neither fill the book nor crowd catch-up replies, whoever collects when.
            self._drop(a.peer_id, "relay_limit", f"over {self.relay_cap(a.peer_id)} relayed origins in a slot")
            return
        slot[key] = (a, msg)
        member = self.members.get(a.peer_id)
        if member is not None and a.origin is None:  # an announcer is live whatever its last heartbeat
            member.expires = max(member.expires, time.time() + MEMBER_TTL)
        self.changed.set()

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
        """Drop the announcements of rounds before `round` and refuse any that come later (the transport
        calls it with its own round minus KEEP_ROUNDS)."""
        if round <= self.floor:
            return
        self.floor = round
        for slot in [k for k in self.announced if k[0] < round]:
            for author in {k[0] for k in self.announced.pop(slot)}:
                self.slots_by[author] -= 1
                if self.slots_by[author] <= 0:
                    del self.slots_by[author]

    # ---- reading ----------------------------------------------------------------------------------------
    def live_members(self, now: float | None = None) -> dict[str, records.Member]:
        """Members whose last heartbeat (or announcement) is younger than MEMBER_TTL and who did not leave."""
        now = time.time() if now is None else now
        for p in [p for p, m in self.members.items() if m.expires < now - 3600]:  # forget the long gone
            del self.members[p]
            self.raw_heartbeats.pop(p, None)
        return {p: m for p, m in self.members.items() if m.expires >= now and not m.left}

    def announcements(self, round: int, stage: int) -> list[records.Announcement]:
        return [a for a, _ in self.announced.get((round, stage), {}).values()]

    def clock_rounds(self, trusted: set[str]) -> list[int]:
        return [c.round for p, c in self.clocks.items() if p in trusted]

    def clock_shards(self, trusted: set[str]) -> int | None:
        """The topic shards the furthest trusted clock says (None: no trusted clock heard)."""
        clocks = [c for p, c in self.clocks.items() if p in trusted]
        return max(clocks, key=lambda c: (c.round, c.started)).shards if clocks else None

    def catch_up_reply(self, round: int, stage: int, rng: random.Random) -> list[pb.PSMessage]:
        """What this node heard that a late joiner needs: the clocks, the live members' heartbeats, and at most
        CATCHUP_MAX announcements of (round, stage) drawn at random; at most CATCHUP_REPLY_BYTES in all."""
        live = self.live_members()
        out = list(self.raw_clocks.values()) + [m for p, m in self.raw_heartbeats.items() if p in live]
        slot = list(self.announced.get((round, stage), {}).values())
        held = {id(m) for m in out}  # a member's last heartbeat may be this slot's announcement itself
        out += [msg for _, msg in rng.sample(slot, min(CATCHUP_MAX, len(slot))) if id(msg) not in held]
        kept, total = [], 0
        for m in out:
            total += len(m.data) + 200
            if total > CATCHUP_REPLY_BYTES:
                break
            kept.append(m)
        return kept


# ---- catch-up over a stream -----------------------------------------------------------------------------------
_HEADER = 8
MAX_CATCHUP_REQUEST = 64


def encode_reply(msgs: list[pb.PSMessage]) -> bytes:
    return msgpack.packb([[bytes(getattr(m, "from")), bytes(m.data), bytes(m.seqno), list(m.topicIDs),
                           bytes(m.signature)] for m in msgs])


def decode_reply(data: bytes, max_items: int = 2 * CATCHUP_MAX + 1024) -> list[pb.PSMessage]:
    """The messages of a catch-up reply; V.Invalid when it is not one. Their signatures are checked by
    Book.handle like the topic's."""
    items = msgpack.unpackb(data, raw=False)
    if type(items) is not list or len(items) > max_items:
        raise V.Invalid("catch-up reply", "not a list of messages")
    out = []
    for it in items:
        if type(it) is not list or len(it) != 5 or not all(type(x) is bytes for x in (it[0], it[1], it[2], it[4])) \
                or type(it[3]) is not list or not all(type(t) is str for t in it[3]):
            raise V.Invalid("catch-up reply", "not a message")
        m = pb.PSMessage(data=it[1], seqno=it[2], signature=it[4])
        setattr(m, "from", it[0])
        m.topicIDs.extend(it[3])
        out.append(m)
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
                        rng: random.Random) -> None:
    try:
        n = int.from_bytes(await asyncio.wait_for(reader.readexactly(_HEADER), 10), "big")
        if n > MAX_CATCHUP_REQUEST:
            return
        req = parse_catchup_request(await asyncio.wait_for(reader.readexactly(n), 10))
        if req is None:
            return
        reply = encode_reply(book.catch_up_reply(*req, rng))
        writer.write(len(reply).to_bytes(_HEADER, "big") + reply)
        await writer.drain()
        await asyncio.wait_for(reader.read(1), 10)  # the asker closes first (see payloads.PayloadServer.handle)
    except Exception as e:  # noqa: BLE001 - a broken or hostile asker: nothing to answer
        log.debug("catch-up request ended: %s", type(e).__name__)
    finally:
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

"""GossipSub through the p2pd that hivemind 1.1.12 ships: our own small binding.

hivemind's Python bindings have no pubsub calls, and `P2P.create` cannot pass the daemon's `-pubsub` flag.
The daemon has both (go-libp2p-pubsub v0.10.0, strict signing on), so:

    PubsubP2P        a P2P whose daemon starts with `-pubsub` (the router defaults to GossipSub)
    publish          Request{PUBSUB, PSRequest{PUBLISH, topic, data}} over a fresh control connection
    Subscription     Request{PUBSUB, PSRequest{SUBSCRIBE, topic}}, then the daemon streams PSMessages over
                     that connection until it is closed
    topic_peers      PSRequest{LIST_PEERS, topic}: the peers we are connected to that subscribe to it
    verify_message   the author (`from`) and its Ed25519 signature over the message, checked in Python

Pitfalls measured here (docs/notes/scale.md §1) that shape the Subscription:
- the daemon cancels a subscription silently when its connection closes, which is what happens when the
  StreamWriter is garbage-collected: the Subscription keeps it, and re-subscribes if the daemon drops it;
- the daemon buffers 32 messages per subscriber and drops the rest ("subscriber too slow"): a reader task
  does nothing but read frames into our own bounded queue, and a second task hands them to the handler.
  Past the queue's size something is dropped and counted: with a `priority` (the authors the node knows),
  the newest message of an author it does not know, else the oldest of those, so that a flood of fresh
  identities cannot push the known peers' messages out; without one, the oldest;
- a message over 1 MiB is accepted by PUBLISH and delivered to nobody: callers keep messages small;
- no validator can be registered: every daemon forwards a message before any Python code looks at it, so
  receivers check everything themselves (gossip.py) and cap every author's rate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from typing import Any, Awaitable, Callable

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import raise_if_failed, read_unsigned_varint, write_pbmsg
from hivemind.proto import p2pd_pb2 as pb

from p2pswarm.identity import verify
from p2pswarm.validate import public_from_peer_id

log = logging.getLogger(__name__)

MAX_FRAME = 1 << 20  # the daemon never delivers more (its 1 MiB message cap); a longer frame is a broken stream
SIGN_PREFIX = b"libp2p-pubsub:"


class PubsubP2P(P2P):
    """A P2P whose daemon runs GossipSub (`-pubsub=1`). `P2P.create` builds the daemon's arguments with the
    static `_make_process_args` on the class it is called on, so overriding it is enough; a test pins that
    the daemon answers pubsub requests (hivemind is pinned at 1.1.12)."""

    @staticmethod
    def _make_process_args(*args: Any, **kwargs: Any) -> list[str]:
        return P2P._make_process_args(*args, pubsub=True, **kwargs)


def _request(ps: pb.PSRequest) -> pb.Request:
    return pb.Request(type=pb.Request.PUBSUB, pubsub=ps)


async def _read_frame(reader: asyncio.StreamReader, msg: Any) -> None:
    n = await read_unsigned_varint(reader)
    if n > MAX_FRAME + 4096:
        raise ValueError(f"pubsub frame of {n} bytes")
    msg.ParseFromString(await reader.readexactly(n))


async def _control(p2p: P2P, ps: pb.PSRequest, timeout: float) -> pb.Response:
    """One request over its own control connection; ControlFailure when the daemon says no."""

    async def go() -> pb.Response:
        reader, writer = await p2p._client.control.daemon_connector.open_connection()
        try:
            await write_pbmsg(writer, _request(ps))
            resp = pb.Response()
            await _read_frame(reader, resp)
            raise_if_failed(resp)
            return resp
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


async def publish(p2p: P2P, topic: str, data: bytes, timeout: float = 10.0) -> None:
    await _control(p2p, pb.PSRequest(type=pb.PSRequest.PUBLISH, topic=topic, data=data), timeout)


async def topic_peers(p2p: P2P, topic: str, timeout: float = 10.0) -> list[str]:
    """Peer ids (base58) of the connected peers that subscribe to `topic`."""
    from hivemind.p2p import PeerID

    resp = await _control(p2p, pb.PSRequest(type=pb.PSRequest.LIST_PEERS, topic=topic), timeout)
    return [PeerID(p).to_base58() for p in resp.pubsub.peerIDs]


async def topics(p2p: P2P, timeout: float = 10.0) -> list[str]:
    resp = await _control(p2p, pb.PSRequest(type=pb.PSRequest.GET_TOPICS), timeout)
    return list(resp.pubsub.topics)


def author_of(msg: pb.PSMessage) -> str | None:
    """The base58 peer id in the message's `from` field, or None when it is not one."""
    from hivemind.p2p import PeerID

    try:
        return PeerID(bytes(getattr(msg, "from"))).to_base58()
    except Exception:  # noqa: BLE001 - any bytes may come from the network
        return None


def verify_message(msg: pb.PSMessage) -> str | None:
    """The author's peer id when `from` is an Ed25519 peer id and `signature` is its signature over the
    message (libp2p's StrictSign: "libp2p-pubsub:" + the message without signature and key); else None.
    The daemon checked it already; checking again costs ~0.1 ms and makes messages handed over by someone
    else (a catch-up reply) exactly as trustworthy as the daemon's."""
    author = author_of(msg)
    if author is None:
        return None
    try:
        key = public_from_peer_id(author)
    except ValueError:
        return None
    bare = pb.PSMessage()
    setattr(bare, "from", getattr(msg, "from"))
    bare.data = msg.data
    bare.seqno = msg.seqno
    bare.topicIDs.extend(msg.topicIDs)
    return author if verify(key, bytes(msg.signature), SIGN_PREFIX + bare.SerializeToString()) else None


Handler = Callable[[pb.PSMessage], Awaitable[None]]


class Subscription:
    """A topic subscription that lasts until `close()`, on the node's event loop.

    One task reads the daemon's frames as fast as they come into a queue of at most `queue_size` messages;
    another hands each to `handler`, whose errors are logged, never raised. `priority(msg)` (optional, never
    raising into the reader) says whether its author is known: those messages are handed on first, and
    when the queue is full the newest message of an unknown author is dropped (else the oldest unknown one,
    else the oldest), counted in `dropped`. Without `priority` the oldest goes. When the daemon ends the
    subscription (it restarted, or the socket broke) it is re-made after a second, for as long as the
    daemon lives."""

    def __init__(self, p2p: P2P, topic: str, handler: Handler, *, queue_size: int = 4096,
                 priority: Callable[[pb.PSMessage], bool] | None = None):
        self.p2p = p2p
        self.topic = topic
        self.handler = handler
        self.priority = priority
        self._known: deque[pb.PSMessage] = deque()
        self._other: deque[pb.PSMessage] = deque()
        self._ready = asyncio.Event()
        self.queue_size = queue_size
        self.received = 0
        self.dropped: Counter[str] = Counter()
        self.subscribed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None  # kept: a collected writer ends the subscription
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def start(self, timeout: float = 10.0) -> Subscription:
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._handle_loop())]
        await asyncio.wait_for(self.subscribed.wait(), timeout)
        return self

    async def _subscribe(self) -> asyncio.StreamReader:
        reader, writer = await self.p2p._client.control.daemon_connector.open_connection()
        self._writer = writer
        await write_pbmsg(writer, _request(pb.PSRequest(type=pb.PSRequest.SUBSCRIBE, topic=self.topic)))
        resp = pb.Response()
        await _read_frame(reader, resp)
        raise_if_failed(resp)
        self.subscribed.set()
        return reader

    async def _read_loop(self) -> None:
        while not self._closed:
            try:
                reader = await self._subscribe()
                while not self._closed:
                    msg = pb.PSMessage()
                    await _read_frame(reader, msg)
                    self.received += 1
                    self.put(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the daemon went away or the stream broke: subscribe again
                if self._closed:
                    break
                log.debug("subscription to %s ended (%s: %s); subscribing again", self.topic, type(e).__name__, e)
                self.subscribed.clear()
                if self._writer is not None:
                    self._writer.close()
                await asyncio.sleep(1.0)

    def qsize(self) -> int:
        return len(self._known) + len(self._other)

    def put(self, msg: pb.PSMessage) -> None:
        """Queue one message, dropping one (counted) when the queue is full (see the class doc)."""
        known = False
        if self.priority is not None:
            try:
                known = bool(self.priority(msg))
            except Exception:  # noqa: BLE001 - an unknown author, whatever went wrong
                known = False
        if self.qsize() >= max(1, self.queue_size):
            self.dropped["queue_full"] += 1
            if self.priority is not None and not known:
                return  # the newest of an unknown author: the queue keeps what it has
            (self._other or self._known).popleft()
        (self._known if known else self._other).append(msg)
        self._ready.set()

    def get_nowait(self) -> pb.PSMessage | None:
        """The next message to hand on (known authors' first), or None."""
        if self._known:
            return self._known.popleft()
        if self._other:
            return self._other.popleft()
        return None

    async def _handle_loop(self) -> None:
        while not self._closed:
            msg = self.get_nowait()
            if msg is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            try:
                await self.handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one message must not end the subscription
                log.warning("pubsub handler: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._writer is not None:
            self._writer.close()

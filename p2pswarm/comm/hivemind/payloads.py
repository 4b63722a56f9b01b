"""Rollout payloads travel peer to peer over a libp2p stream, pulled by the peers that want them.

    request  = msgpack [round, stage] or [round, stage, origin]   (at most 128 bytes; origin: a relayed peer;
               parse_request: round and stage in [0, 2**31), origin a peer id, anything else unanswered)
    reply    = 8-byte big-endian length, then the signed wire bytes (length 0: "I don't have it")

The puller reads the length first and refuses anything over the size cap before reading the body, so a
hostile peer cannot make us buffer more than `max_bytes`. Every pull runs under a timeout.

Serving is bounded the same way (`StreamGate`, also used by gossip.py's catch-up stream): at most a fixed
number of handlers at once per protocol, a token bucket of requests per requesting peer (a bounded table:
identities cost nothing), the request read under one deadline, and the reply's write and drain under one
deadline scaled to its size (`send_within`), so a puller that asks for megabytes and never reads holds a
handler, its stream and the unsent bytes for seconds, not for good.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pswarm.bounded import MAX_PEERS, Recent, RecentCounter
from p2pswarm import validate as V

log = logging.getLogger(__name__)

PROTOCOL = "p2pswarm.rollouts/1"
_HEADER = 8
MAX_REQUEST = 128


class PullError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


MAX_PULLS = 4  # times one peer may pull the same payload (an honest puller needs 1, a retry 2)
READ_TIMEOUT = 10.0  # seconds for a whole request to arrive, and for the puller to close after the reply
SEND_TIMEOUT, SEND_RATE = 10.0, 128 * 1024.0  # a reply's write + drain: this many seconds, plus its size at this rate
MAX_SERVING = 64  # payload requests handled at once; more are closed unanswered (counted `busy`)
PULL_RATE, PULL_BURST = 8.0, 128.0  # payload requests a second per requesting peer, and the burst (a bridge's origins)


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
        self.level = min(self.burst, self.level + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.level < n:
            return False
        self.level -= n
        return True


class StreamGate:
    """Who may be served on one stream protocol: at most `concurrent` handlers at once (a semaphore that
    never queues: past it a stream is closed at once) and a token bucket of `rate` requests a second (burst
    `burst`) per requesting peer, kept for at most MAX_PEERS peers (the least recently seen forgotten
    first). A reply must be taken within `send_timeout` seconds plus its size at `send_rate` (send_within).
    What is refused is counted in `drops` by reason (busy, over_rate, send_timeout); nothing here waits or
    raises. Used on the event loop only."""

    def __init__(self, concurrent: int, rate: float, burst: float, *, send_timeout: float = SEND_TIMEOUT,
                 send_rate: float = SEND_RATE, maxsize: int = MAX_PEERS, clock=time.monotonic):
        self.concurrent, self.rate, self.burst = concurrent, rate, burst
        self.send_timeout, self.send_rate = send_timeout, send_rate
        self.active = 0
        self.buckets: Recent = Recent(maxsize)
        self.drops: Counter[str] = Counter()
        self.refused: Counter[str] = RecentCounter(maxsize)  # by requesting peer
        self.clock = clock

    def admit(self, requester: str) -> bool:
        """True (and one handler more in flight: call `release` when done) or False, counted."""
        if self.active >= self.concurrent:
            return self._refuse(requester, "busy")
        if requester:
            bucket = self.buckets.get(requester)
            if bucket is None:
                bucket = Bucket(self.rate, self.burst)
            self.buckets[requester] = bucket  # the newest: an active peer is the last to be forgotten
            if not bucket.take(1, self.clock()):
                return self._refuse(requester, "over_rate")
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)

    def _refuse(self, requester: str, reason: str) -> bool:
        self.drops[reason] += 1
        if requester:
            self.refused[requester] += 1
        return False


def requester_of(info: Any) -> str:
    """The authenticated peer id of a stream's other end ("" when the stream info has none)."""
    try:
        return str(getattr(info, "peer_id", "") or "")
    except Exception:  # noqa: BLE001 - whatever the object, no id
        return ""


async def read_request(reader: asyncio.StreamReader, max_bytes: int, timeout: float = READ_TIMEOUT) -> bytes | None:
    """A length-prefixed request of at most `max_bytes`, all of it within `timeout` seconds; None when it is
    longer (unread)."""

    async def go() -> bytes | None:
        n = int.from_bytes(await reader.readexactly(_HEADER), "big")
        return None if n > max_bytes else await reader.readexactly(n)

    return await asyncio.wait_for(go(), timeout)


async def send_within(writer: asyncio.StreamWriter, data: bytes, *, timeout: float = SEND_TIMEOUT,
                      rate: float = SEND_RATE) -> None:
    """Write the 8-byte length and `data`, and drain it, all under one deadline: `timeout` seconds plus
    len(data) at `rate` bytes a second. asyncio.TimeoutError when the reader does not take it by then (the
    caller closes the stream, which frees what is still buffered)."""
    writer.write(len(data).to_bytes(_HEADER, "big"))
    if data:
        writer.write(data)
    await asyncio.wait_for(writer.drain(), timeout + len(data) / max(1.0, rate))


class PayloadServer:
    """This peer's published payloads by (round, stage), the last `keep_rounds` rounds.

    Each requesting peer (the stream's authenticated peer id) may pull a payload at most MAX_PULLS times:
    beyond that it is answered "not served" and counted in `refused`, so that one peer cannot make this
    one upload the same megabytes over and over. Fresh identities get around that, so the server also caps
    the handlers in flight and each requester's request rate, and bounds the time a reply may take to send
    (`gate`)."""

    def __init__(self, keep_rounds: int = 4, *, gate: StreamGate | None = None):
        self.keep_rounds = keep_rounds
        self._payloads: dict[tuple[int, int, str], bytes] = {}
        self._pulls: Counter[tuple[str, int, int, str]] = RecentCounter(4 * MAX_PEERS)
        self._lock = threading.Lock()
        self.served = 0
        self.bytes_served = 0
        self.refused: Counter[str] = RecentCounter()  # pulls over the limit, by requesting peer id
        self.gate = gate or StreamGate(MAX_SERVING, PULL_RATE, PULL_BURST)

    def put(self, round: int, stage: int, data: bytes, origin: str = "") -> None:
        with self._lock:
            self._payloads[(round, stage, origin)] = data
            for key in [k for k in self._payloads if k[0] < round - self.keep_rounds]:
                del self._payloads[key]
            for key in [k for k in self._pulls if k[1] < round - self.keep_rounds]:
                del self._pulls[key]

    def get(self, round: int, stage: int, origin: str = "") -> bytes:
        with self._lock:
            return self._payloads.get((round, stage, origin), b"")

    async def handle(self, _info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requester = requester_of(_info)
        if not self.gate.admit(requester):
            writer.close()
            return
        try:
            raw = await read_request(reader, MAX_REQUEST)
            req = None if raw is None else parse_request(raw)
            if req is None:
                return
            data = self.get(*req)
            if data and requester:
                with self._lock:
                    self._pulls[(requester, *req)] += 1
                    if self._pulls[(requester, *req)] > MAX_PULLS:
                        self.refused[requester] += 1
                        data = b""
            try:
                await send_within(writer, data, timeout=self.gate.send_timeout, rate=self.gate.send_rate)
            except asyncio.TimeoutError:
                self.gate.drops["send_timeout"] += 1
                log.debug("payload reply to %s not taken in time: dropped", requester[-8:])
                return
            if data:
                # Closing right after drain() lets p2pd drop the stream's tail (measured: 14 of 7,300 1 MB
                # pulls cut short); the puller closes first once it has everything.
                await asyncio.wait_for(reader.read(1), READ_TIMEOUT)
                self.served += 1
                self.bytes_served += len(data)
        except Exception as e:  # noqa: BLE001 - a broken or hostile caller: nothing to answer, no traceback
            log.debug("payload request ended: %s", type(e).__name__)
        finally:
            self.gate.release()
            writer.close()


def parse_request(data: Any) -> tuple[int, int, str] | None:
    """(round, stage, origin) of a request, origin "" for the server's own payload; None for anything else
    (never raises): round and stage ints in [0, 2**31), origin a peer id, at most MAX_REQUEST bytes."""
    try:
        if type(data) is not bytes or len(data) > MAX_REQUEST:
            return None
        req = msgpack.unpackb(data, raw=False)
        if type(req) is not list or len(req) not in (2, 3):
            return None
        rnd, stage = V.integer(req[0], "round", 0), V.integer(req[1], "stage", 0)
        return rnd, stage, V.peer_id(req[2], "origin") if len(req) == 3 else ""
    except Exception:  # noqa: BLE001 - whatever the bytes, not a request
        return None


async def pull(p2p: Any, peer_id: str, round: int, stage: int, *, max_bytes: int, timeout: float,
               origin: str | None = None) -> bytes:
    """The payload `peer_id` published (or relays for `origin`) for (round, stage); PullError(reason) when it
    cannot be had."""
    from hivemind.p2p import PeerID

    async def _pull() -> bytes:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), PROTOCOL)
        try:
            req = msgpack.packb([round, stage] if origin is None else [round, stage, origin])
            writer.write(len(req).to_bytes(_HEADER, "big") + req)
            await writer.drain()
            n = int.from_bytes(await reader.readexactly(_HEADER), "big")
            if n == 0:
                raise PullError("not_served")
            if n > max_bytes:
                raise PullError("too_large")
            return await reader.readexactly(n)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(_pull(), timeout)
    except asyncio.TimeoutError:
        raise PullError("pull_timeout") from None
    except PullError:
        raise
    except asyncio.IncompleteReadError:
        raise PullError("truncated") from None
    except Exception as e:  # noqa: BLE001 - the peer is gone, refused the stream, reset it...
        raise PullError("unreachable") from e

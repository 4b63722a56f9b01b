"""Rollout payloads travel peer to peer over a libp2p stream, pulled by the peers that want them.

    request  = msgpack [round, stage] or [round, stage, origin]   (at most 128 bytes; origin: a relayed peer;
               parse_request: round and stage in [0, 2**31), origin a peer id, anything else unanswered)
    reply    = 8-byte big-endian length, then the signed wire bytes (length 0: "I don't have it")

The puller reads the length first and refuses anything over the size cap before reading the body, so a
hostile peer cannot make us buffer more than `max_bytes`. Every pull runs under a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from typing import Any

import msgpack

from p2pswarm.bounded import RecentCounter
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


class PayloadServer:
    """This peer's published payloads by (round, stage), the last `keep_rounds` rounds.

    Each requesting peer (the stream's authenticated peer id) may pull a payload at most MAX_PULLS times:
    beyond that it is answered "not served" and counted in `refused`, so that one peer cannot make this
    one upload the same megabytes over and over."""

    def __init__(self, keep_rounds: int = 4):
        self.keep_rounds = keep_rounds
        self._payloads: dict[tuple[int, int, str], bytes] = {}
        self._pulls: Counter[tuple[str, int, int, str]] = Counter()
        self._lock = threading.Lock()
        self.served = 0
        self.bytes_served = 0
        self.refused: Counter[str] = RecentCounter()  # pulls over the limit, by requesting peer id

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
        try:
            header = await asyncio.wait_for(reader.readexactly(_HEADER), 10)
            n = int.from_bytes(header, "big")
            if n > MAX_REQUEST:
                return
            req = parse_request(await asyncio.wait_for(reader.readexactly(n), 10))
            if req is None:
                return
            data = self.get(*req)
            requester = str(getattr(_info, "peer_id", ""))
            if data and requester:
                with self._lock:
                    self._pulls[(requester, *req)] += 1
                    if self._pulls[(requester, *req)] > MAX_PULLS:
                        self.refused[requester] += 1
                        data = b""
            writer.write(len(data).to_bytes(_HEADER, "big"))
            writer.write(data)
            await writer.drain()
            if data:
                # Closing right after drain() lets p2pd drop the stream's tail (measured: 14 of 7,300 1 MB
                # pulls cut short); the puller closes first once it has everything.
                await asyncio.wait_for(reader.read(1), 10)
                self.served += 1
                self.bytes_served += len(data)
        except Exception as e:  # noqa: BLE001 - a broken or hostile caller: nothing to answer, no traceback
            log.debug("payload request ended: %s", type(e).__name__)
        finally:
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

"""BoundedHTTPProvider: the one JSON-RPC-over-HTTP transport of the chain client, bounded in time, size and depth.

An RPC endpoint is a server on the network: it may be hostile or broken. web3's HTTPProvider (requests)
trusts it three ways, each fixed here for every call the client makes (views, transactions, receipts,
blocks, batches):

* Time. requests' `timeout` bounds each socket read, not the call: a server that drips its reply a byte at
  a time holds the calling thread (the game loop) for as long as it likes. Here every call has one total
  deadline (`deadline`, 10 s): connecting, name resolution, TLS, sending and every read get only what is
  left of it, and a call that runs out fails with RPCError("... no complete reply in 10 s").
* Size. The reply is read in chunks and dropped once it passes `max_bytes` (4 MiB: the largest reply
  the client asks for, a block's header and its transaction hashes, is a few hundred KB on busy chains); a
  Content-Length over the cap is refused before anything is read.
* Depth. Importing web3 imports py_ecc, which raises the interpreter's recursion limit to 100000 for its
  own recursive arithmetic; CPython's json parser recurses once per nested `[`/`{` and checks only that
  limit, so ~400 KB of `[` overflow the C stack and kill the process (SIGSEGV) before any exception can
  be raised. Lowering the limit back is no fix: it is global state that py_ecc (or any later import) may
  raise again, and how deep the C stack actually goes before it overflows depends on the thread's stack
  size, not on that number. So the body's nesting depth is measured first, without recursion and in
  C-speed passes (`nesting_ok`), and a reply nested deeper than `max_depth` (64; JSON-RPC replies the
  client reads are at most 5 deep), or with more than MAX_STRUCTURE quotes and brackets, is dropped
  before json ever sees it.

A dropped reply raises RPCError (a ChainError: one line, never a traceback) and is counted in
`provider.dropped[reason]`. Not supported: HTTP proxies from the environment (requests honoured
HTTP(S)_PROXY), connection reuse (each call opens one connection: a poll every few seconds does not need
keep-alive), redirects. Thread-safe: calls share no connection.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import unquote, urlsplit

from web3.providers.base import JSONBaseProvider

from p2pswarm.comm.chain.client import ChainError

CALL_DEADLINE = 10.0  # seconds, the whole call: resolve, connect, TLS, send, every byte of the reply
MAX_RESPONSE = 4 * 1024 * 1024  # bytes of one reply body
MAX_DEPTH = 64  # nesting of `[`/`{` in one reply
_RESOLVE_TTL = 60.0  # seconds a name's addresses are reused (resolution runs off the calling thread)
_CHUNK = 64 * 1024

MAX_STRUCTURE = 1 << 18  # quotes and brackets in one reply (a block of 60k transaction hashes has 120k)
_STRING = re.compile(rb'"[^"]*"')  # a string, once escapes are gone and only quotes and brackets are left
_STRUCTURE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


class RPCError(ChainError):
    """A reply dropped by the transport (or none came): one line naming the endpoint and why."""

    def __init__(self, where: str, detail: str, reason: str):
        super().__init__(f"the chain at {where}: {detail}")
        self.detail, self.reason = detail, reason


def nesting_ok(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text `body` nests `[`/`{` at most `limit` deep (brackets balanced, strings closed,
    at most MAX_STRUCTURE quotes and brackets). No recursion and no Python loop over the bytes, so its cost
    is a few C passes over the body whatever it holds: escaped backslashes, then escaped quotes are cut
    (pairing backslashes left to right as json's lexer does), only quotes and brackets are kept (`{}` read as
    `[]`), strings are cut, and each bytes.replace pass removes the innermost level. Sound for what json
    would parse: up to the first byte where json fails (a stray backslash, an unterminated string), both
    read the same tokens; past it, anything left only makes the answer False, which json agrees with."""
    s = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_STRUCTURE, _NOT_STRUCTURE)
    if len(s) > MAX_STRUCTURE:
        return False
    s = _STRING.sub(b"", s)
    for _ in range(limit):
        if not s:
            return True
        inner = s.replace(b"[]", b"")
        if len(inner) == len(s):  # nothing closes: unbalanced, or an unterminated string
            return False
        s = inner
    return not s


class _DeadlineReader(io.RawIOBase):
    """The reading side of a socket for http.client: each read gets what is left of the call's deadline,
    so however the reply is dripped (status line, headers, body), reading it ends by the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("call deadline")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket: makefile("rb")."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode: str, *args: Any, **kwargs: Any):
        return io.BufferedReader(_DeadlineReader(self.sock, self.deadline))


class BoundedHTTPProvider(JSONBaseProvider):
    """A web3 provider for `url` (http:// or https://, optionally user:password@) with a total deadline per
    call, a cap on the reply's size and a check of its nesting depth before it is parsed."""

    def __init__(self, url: str, *, deadline: float | None = None, max_bytes: int | None = None,
                 max_depth: int | None = None):
        super().__init__()
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ChainError(f"chain_rpc {url!r} is not an http(s):// JSON-RPC URL")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise ChainError(f"chain_rpc {url!r} has no valid port") from None
        self.endpoint_uri = url
        self.deadline = CALL_DEADLINE if deadline is None else deadline
        self.max_bytes = MAX_RESPONSE if max_bytes is None else max_bytes
        self.max_depth = MAX_DEPTH if max_depth is None else max_depth
        self._tls = u.scheme == "https"
        self._host, self._port = u.hostname, port
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        self._host_header = host if u.port is None else f"{host}:{u.port}"
        self._auth = ""
        if u.username is not None:
            cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
            self._auth = f"Authorization: Basic {base64.b64encode(cred).decode()}\r\n"
        self._where = f"{u.scheme}://{self._host_header}"  # never the credentials
        self._resolved: tuple[float, list] = (0.0, [])
        self._lock = threading.Lock()
        self.dropped: Counter[str] = Counter()  # replies dropped (or none came), by reason

    def __str__(self) -> str:
        return f"bounded JSON-RPC over HTTP at {self._where}"

    # ---- web3's provider interface ---------------------------------------------------------------------
    def make_request(self, method, params):
        reply = self._call(self.encode_rpc_request(method, params), str(method))
        if not isinstance(reply, dict):
            raise self._drop("malformed", f"{method}: the reply is not a JSON-RPC object")
        return reply

    def make_batch_request(self, requests):
        reply = self._call(self.encode_batch_rpc_request(requests), "a batch")
        if isinstance(reply, dict):  # one error object for the whole batch, as HTTPProvider returns it
            return reply
        if (not isinstance(reply, list) or len(reply) != len(requests)
                or not all(isinstance(r, dict) and type(r.get("id")) is int for r in reply)):
            raise self._drop("malformed", "a batch: the reply is not one JSON-RPC object per request")
        return sorted(reply, key=lambda r: r["id"])

    # ---- one call ------------------------------------------------------------------------------------
    def _drop(self, reason: str, why: str) -> RPCError:
        with self._lock:
            self.dropped[reason] += 1
        return RPCError(self._where, why, reason)

    def _call(self, body: bytes, what: str) -> Any:
        deadline = time.monotonic() + self.deadline
        try:
            raw = self._post(body, deadline, what)
        except RPCError:
            raise
        except TimeoutError:
            raise self._drop("timeout", f"{what}: no complete reply in {self.deadline:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:  # ssl.SSLError is an OSError
            raise self._drop("unreachable", f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:120]}") from None
        if not nesting_ok(raw, self.max_depth):
            raise self._drop("too_deep", f"{what}: reply nested deeper than {self.max_depth} or malformed, "
                                         f"{len(raw)} bytes, dropped unparsed")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, digits over the limit
            raise self._drop("malformed", f"{what}: the reply is not JSON ({type(e).__name__})") from None

    def _post(self, body: bytes, deadline: float, what: str) -> bytes:
        sock = self._connect(deadline)
        try:
            head = (f"POST {self._path} HTTP/1.1\r\nHost: {self._host_header}\r\nUser-Agent: p2pswarm\r\n"
                    f"Content-Type: application/json\r\nAccept: application/json\r\n{self._auth}"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            data = memoryview(head + body)
            while data:  # each send gets what is left: a server that will not read cannot hold the call
                sock.settimeout(_left(deadline))
                data = data[sock.send(data):]
            resp = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method="POST")
            resp.begin()
            if not 200 <= resp.status < 300:
                raise self._drop("http_status", f"{what}: HTTP {resp.status} {' '.join(str(resp.reason).split())[:60]}")
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
                raise self._drop("too_large", f"{what}: a reply of {int(length)} bytes, over the {self.max_bytes} cap")
            chunks, size = [], 0
            while True:
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._drop("too_large", f"{what}: a reply over the {self.max_bytes} byte cap, dropped")
                chunks.append(chunk)
        finally:
            sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        last: OSError = OSError("no address")
        for family, kind, proto, _, addr in self._addresses(deadline):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_left(deadline))
                sock.connect(addr)
                if self._tls:  # the handshake's timeout is one deadline for all of it (CPython's _ssl)
                    sock.settimeout(_left(deadline))
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
                return sock
            except TimeoutError:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                last = e
        raise last

    def _addresses(self, deadline: float) -> list:
        """The host's addresses. getaddrinfo cannot be given a timeout: a name (not an IP literal) is resolved
        on a helper thread that the call stops waiting for at its deadline, and reused for a minute."""
        try:
            ipaddress.ip_address(self._host)
            return socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)  # a literal: no lookup
        except ValueError:
            pass
        at, addrs = self._resolved
        if addrs and time.monotonic() - at < _RESOLVE_TTL:
            return addrs
        box: dict[str, Any] = {}

        def resolve() -> None:
            try:
                box["addrs"] = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            except OSError as e:
                box["error"] = e

        t = threading.Thread(target=resolve, name="p2pswarm-rpc-resolve", daemon=True)
        t.start()
        t.join(_left(deadline))
        if t.is_alive():
            raise TimeoutError("name resolution")
        if "error" in box:
            raise box["error"]
        self._resolved = (time.monotonic(), box["addrs"])
        return box["addrs"]


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("call deadline")
    return left


def bounded_web3(url: str, **bounds: Any):
    """A Web3 instance over BoundedHTTPProvider (`bounds`: deadline, max_bytes, max_depth)."""
    from web3 import Web3

    return Web3(BoundedHTTPProvider(url, **bounds))

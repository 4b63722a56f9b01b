"""Re-dialling lost peers, so that the swarm heals after any restart.

hivemind dials its initial peers once, at start, and drops a peer from its DHT routing table after one
failed request. A bootstrap peer that is killed and restarted is therefore never contacted again: it sees
no peer, its clock stops, and peers that restart through it form a second swarm beside the first. The
`Redialer` is the node's remedy: a loop on the node's event loop that keeps a book of the peers worth
reaching (the initial peers, always; every DHT peer met since, and, for a bootstrap, those of its previous
life read back from a file) and dials again those that are not in the routing table, with capped
exponential backoff and jitter so that a thousand peers do not hammer a restarting one in step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pswarm import validate as V

log = logging.getLogger(__name__)

MAX_KNOWN = 256  # peers kept in the book (initial peers always); the oldest seen go first
MAX_ADDRS = 4  # addresses kept per peer, the newest first
MAX_ADDR_LEN = 256
BOOK_VERSION = 1
SAVE_EVERY = 300.0


def split_maddr(maddr: str) -> tuple[str, str]:
    """'/ip4/…/tcp/…/p2p/ID' -> ('/ip4/…/tcp/…', 'ID'); ('', '') when it has no /p2p/ part."""
    head, sep, tail = maddr.rpartition("/p2p/")
    return (head, tail) if sep and head and "/" not in tail else ("", "")


def address(v: Any, field: str) -> str:
    """A dialable multiaddr without its /p2p/ part, as the book keeps it (from a file: untrusted)."""
    from hivemind.utils.multiaddr import Multiaddr

    s = V.text(v, field, MAX_ADDR_LEN, min_len=1)
    try:
        m = Multiaddr(s)
        protocols = {p.name for p in m.protocols()}
    except Exception:  # noqa: BLE001 - multiaddr raises several types for bad input
        raise V.Invalid(field, "not a multiaddr") from None
    if "p2p" in protocols or not protocols & {"tcp", "udp"}:
        raise V.Invalid(field, "not a transport address without /p2p/")
    return s


def _list(v: Any, field: str) -> list:
    if type(v) is not list:
        raise V.Invalid(field, "not a list")
    return v


@dataclass
class Known:
    """One peer of the book. `healthy`: in our DHT routing table at the last check."""

    addrs: list[str]
    pinned: list[str] = field(default_factory=list)  # an initial peer's given addresses: never forgotten
    seen: float = 0.0  # wall-clock time it was last in the routing table (0: never)
    fails: int = 0  # dials in a row that did not bring it back
    due: float = 0.0  # monotonic time of the next dial
    healthy: bool = False
    lost_since: float | None = None  # wall-clock time it was last known up, once lost (None: not lost)

    def learn(self, addrs: list[str]) -> None:
        self.addrs = list(dict.fromkeys([*addrs, *self.addrs]))[:MAX_ADDRS]

    @property
    def dial_addrs(self) -> list[str]:
        return list(dict.fromkeys([*self.addrs, *self.pinned]))


def _ed25519(pid: str) -> bool:
    try:
        V.peer_id(pid, "peer")
        return True
    except V.Invalid:
        return False


class Redialer:
    """The node's background loop (HivemindNode starts it): every `period` seconds, on the node's loop,

    - learns the DHT peers it is connected to (their current addresses, and when they were last seen);
    - dials at most `max_dials` of the peers in its book that are not in the DHT routing table (the lost
      ones, and any initial peer), each under `timeout`, and pings the ones that answer so hivemind puts
      them back in the routing table (a ping also makes a DHT server add us to its own);
    - backs off per peer after each failed dial: base · 2^(fails−1), at most `cap` seconds, times a random
      factor in [0.5, 1] (jitter);
    - logs one INFO line when a lost peer (or an initial peer) is reached again;
    - keeps at most MAX_KNOWN peers: initial peers always, the others forgotten `forget` seconds after
      they were last seen, or oldest first when the book is full;
    - with `path`, reads the book at start and writes it back (atomically) when a peer joins or leaves it,
      so a restarted node (the bootstrap) dials the swarm it knew. Every field read back is validated;
      bad entries are dropped and counted.

    Nothing here raises into the node: a failing tick is logged at DEBUG and the next one runs.
    """

    def __init__(self, node: Any, initial_peers: list[str], *, path: Path | None = None, period: float = 2.0,
                 base: float = 1.0, cap: float = 16.0, max_dials: int = 8, timeout: float = 5.0,
                 forget: float = 24 * 3600.0):
        self.node = node
        self.path = Path(path) if path else None
        self.period, self.base, self.cap = period, base, cap
        self.max_dials, self.timeout, self.forget = max_dials, timeout, forget
        self.book: dict[str, Known] = {}
        self.dials = self.reached = self.failed = self.dropped = 0
        self._dirty = False
        self._saved_at = time.monotonic()
        self._stopped = False
        if self.path is not None:
            self._load()
        for m in initial_peers:
            addr, pid = split_maddr(m)
            if pid and pid != node.peer_id:
                self.book.setdefault(pid, Known([])).pinned.append(addr)

    # ---- the book on disk ---------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("known peers: cannot read %s (%s); starting without them", self.path, e.strerror)
            return
        try:
            doc = V.mapping(V.json_value(raw), "known peers")
            entries = V.field(doc, "peers", V.mapping)
        except V.Invalid as e:
            log.warning("known peers: %s is not a peer book (%s); starting without it", self.path, e)
            return
        now = time.time()
        for pid, entry in list(entries.items())[:MAX_KNOWN]:
            try:
                V.peer_id(pid, "peer")
                addrs = V.field(entry, "addrs", _list)
                known = Known([address(a, "addr") for a in addrs[:MAX_ADDRS]],
                              seen=V.field(entry, "seen", V.timestamp, now))
            except V.Invalid as e:
                self.dropped += 1
                log.debug("known peers: entry dropped: %s", e)
                continue
            if known.addrs and pid != self.node.peer_id and now - known.seen < self.forget:
                known.lost_since = known.seen  # from a previous life: reaching it again is worth a line
                self.book[pid] = known
        dropped = self.dropped + max(0, len(entries) - MAX_KNOWN)
        log.info("known peers: %d read from %s%s", len(self.book), self.path,
                 f" ({dropped} invalid or over the limit, dropped)" if dropped else "")

    def _save(self) -> None:
        from p2pswarm.run import atomic_write_text

        peers = {p: {"addrs": k.dial_addrs[:MAX_ADDRS], "seen": k.seen} for p, k in self.book.items() if k.seen > 0}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": BOOK_VERSION, "peers": peers}))
            self._dirty, self._saved_at = False, time.monotonic()
        except OSError as e:
            log.debug("known peers: cannot write %s: %s", self.path, e)

    # ---- the loop -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopped:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a daemon hiccup: the next tick tries again
                log.debug("re-dial tick failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.period)

    def close(self) -> None:
        self._stopped = True
        if self.path is not None and self._dirty:
            self._save()

    async def tick(self) -> None:
        """One period's work: learn, mark lost, dial the due ones, forget the stale ones, save."""
        table = self.node.dht.protocol.routing_table.peer_id_to_uid
        in_table = {p.to_base58() for p in table}
        conns = {p.peer_id.to_base58(): [str(a) for a in p.addrs] for p in await self.node.p2p.list_peers()}
        now, mono = time.time(), time.monotonic()
        for pid in in_table:
            known = self.book.get(pid)
            if known is None:
                if pid == self.node.peer_id or pid not in conns or not _ed25519(pid):
                    continue  # no address to keep, or not a p2pswarm identity
                known = self.book[pid] = Known([])
                self._dirty = True
            elif known.pinned and pid not in conns:
                continue  # an initial peer is dialled until connected: cheap, and it keeps its address fresh
            known.learn([a for a in conns.get(pid, []) if "/p2p-circuit" not in a])
            known.seen = now
            self._back(pid, known)
        for pid, known in self.book.items():
            if known.healthy and (pid not in in_table or known.pinned and pid not in conns):
                known.healthy, known.lost_since, known.fails, known.due = False, known.seen or now, 0, mono
                log.debug("lost peer %s", pid)
        due = sorted((k.due, p) for p, k in self.book.items() if not k.healthy and k.due <= mono)
        await asyncio.gather(*(self._dial(p) for _, p in due[:self.max_dials]))
        self._forget(now)
        # Also every SAVE_EVERY s: the times last seen age, and a book read back is forgotten by them.
        if self.path is not None and (self._dirty or mono - self._saved_at > SAVE_EVERY):
            await asyncio.get_running_loop().run_in_executor(None, self._save)  # fsync: not on the loop

    def _back(self, pid: str, known: Known) -> None:
        if known.healthy:
            return
        known.healthy, known.fails = True, 0
        if known.lost_since is not None:
            self.reached += 1
            log.info("reached peer %s again after %.0f s (%s): back in the routing table", pid,
                     time.time() - known.lost_since, known.dial_addrs[0] if known.dial_addrs else "no address")
            known.lost_since = None
        self._dirty = True

    async def _dial(self, pid: str) -> None:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        known = self.book[pid]
        self.dials += 1
        peer = PeerID.from_base58(pid)
        ok = False
        try:
            # Our addresses first: the daemon forgets a disconnected peer's addresses after a while.
            await asyncio.wait_for(self.node.p2p._client.connect(peer, [Multiaddr(a) for a in known.dial_addrs]),
                                   self.timeout)
            ok = await asyncio.wait_for(self.node.dht.protocol.call_ping(peer), self.timeout) is not None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable, refused, timed out: all the same here
            log.debug("re-dial of %s failed: %s", pid, e)
        if ok:  # call_ping puts it in the routing table itself, in a task of its own
            known.seen = time.time()
            self._back(pid, known)
            return
        self.failed += 1
        known.fails += 1
        delay = min(self.cap, self.base * 2 ** (known.fails - 1))
        known.due = time.monotonic() + delay * random.uniform(0.5, 1.0)
        if known.lost_since is None:  # an initial peer that was never reached: its first success is news too
            known.lost_since = time.time()

    def _forget(self, now: float) -> None:
        stale = [p for p, k in self.book.items() if not k.pinned and not k.healthy and now - k.seen > self.forget]
        extra = sorted((k.seen, p) for p, k in self.book.items() if not k.pinned and p not in stale)
        stale += [p for _, p in extra[:max(0, len(self.book) - len(stale) - MAX_KNOWN)]]
        for p in stale:
            del self.book[p]
            self._dirty = True

    def counters(self) -> dict[str, int]:
        return {"peers_known": len(self.book), "peers_reached_again": self.reached, "redials": self.dials,
                "redials_failed": self.failed}

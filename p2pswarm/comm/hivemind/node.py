"""A hivemind peer run inside this process: libp2p daemon (P2P) + Kademlia DHT (DHTNode) in our own asyncio
loop, on a background thread. Synchronous code (the round loop) calls into it with `node.call(coro)`.

Why not `hivemind.DHT`: it forks a process and talks to it over a pipe; a SIGKILLed node then leaves that
process and its p2pd alive (stale records, "identity already taken" on restart), large stores can kill it,
and it doubles memory. Here p2pd is our child and exits as soon as its control connection to us closes,
which the kernel does when we die, however we die.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack

from p2pswarm import validate as V
from p2pswarm.errors import UserError
from p2pswarm.identity import Identity

if TYPE_CHECKING:
    from p2pswarm.comm.hivemind.redial import Redialer

log = logging.getLogger(__name__)
T = TypeVar("T")

TIME_PROTOCOL = "p2pswarm.time/1"
DEFAULT_PORT = 38331


class StartupError(UserError, RuntimeError):
    """The node cannot start; the message is one line naming the cause and what to do."""


@dataclass
class NetConfig:
    initial_peers: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 0  # 0: any free port
    announce_maddrs: list[str] = field(default_factory=list)
    client_mode: bool = False  # behind NAT: dial out only; others answer over the connection we opened
    use_relay: bool = True
    use_auto_relay: bool = False
    max_clock_skew: float = 3.0
    startup_timeout: float = 30.0
    # Re-dialling lost peers (redial.py): every `redial_period` s; `known_peers`, a file that keeps the peers
    # met across restarts (the bootstrap's state dir), so a restarted node dials the swarm it knew.
    redial_period: float = 2.0
    known_peers: str = ""


def peer_id_of(maddr: str) -> str:
    """The /p2p/ part of a multiaddr; StartupError when there is none or it does not parse."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        return Multiaddr(maddr)["p2p"]
    except Exception:  # noqa: BLE001 - multiaddr raises several types for bad input
        raise StartupError(f"initial peer {maddr!r} is not a full multiaddr like "
                           "/ip4/203.0.113.5/tcp/38331/p2p/12D3KooW... (the bootstrap peer prints it)") from None


def check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # As p2pd binds: a node restarted at once finds its old connections in TIME_WAIT on the port, which
        # a plain bind takes for "in use"; a port another process listens on is still refused.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use (another p2pswarm node or bootstrap "
                                   "peer?): stop it or choose another port with --port") from None
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None


class HivemindNode:
    def __init__(self, identity: Identity, key_path: str | Path, net: NetConfig, *,
                 clock: Callable[[], float] = time.time, validators: list | None = None):
        from p2pswarm.comm.hivemind.records import Ed25519OwnerValidator

        self.identity = identity
        self.peer_id = identity.peer_id
        self.key_path = str(key_path)
        self.net = net
        self.clock = clock
        self.validator = Ed25519OwnerValidator(identity)
        self.p2p: Any = None
        self.dht: Any = None
        self.maddrs: list[str] = []
        self.clock_skew = 0.0
        self.redialer: Redialer | None = None
        self._redial_task: asyncio.Future | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"hivemind-{identity.name}", daemon=True)
        self._closed = False

    # ---- the loop thread --------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the node's loop and wait for its result (from any other thread)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """Start a background task on the node's loop; the future cancels it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    # ---- start ------------------------------------------------------------------------------------------
    def start(self) -> HivemindNode:
        t0 = time.monotonic()
        self._thread.start()
        try:
            self.call(self._start(), timeout=self.net.startup_timeout + 15)
        except TimeoutError:
            self.close()
            raise StartupError(f"the p2p node did not start within {self.net.startup_timeout + 15:.0f} s") from None
        except BaseException:
            self.close()
            raise
        log.debug("p2p node %s up in %.1f s%s", self.peer_id, time.monotonic() - t0,
                 f" (client mode, clock skew {self.clock_skew:+.2f} s)" if self.net.client_mode else "")
        return self

    async def _start(self) -> None:
        from hivemind.dht.node import DHTNode
        from hivemind.dht.validation import CompositeValidator
        from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

        from p2pswarm.comm.hivemind.pubsub import PubsubP2P

        net = self.net
        peers = [m for m in net.initial_peers if peer_id_of(m) != self.peer_id]  # a restarted bootstrap lists itself
        if not net.client_mode:
            check_port_free(net.host, net.port)
        if peers:
            await self._check_identity_free(peers)
        elif net.initial_peers:  # only our own address: a restarted bootstrap, unless that one still runs
            await self._check_identity_free(net.initial_peers, unreachable_ok=True)
        ip = "ip6" if ":" in net.host else "ip4"
        os.environ.setdefault("GOLOG_LOG_LEVEL", "error")  # p2pd's own log lines are noise to a user
        try:
            self.p2p = await PubsubP2P.create(  # GossipSub on: the swarm's topic (gossip.py)
                initial_peers=peers or None,
                host_maddrs=[f"/{ip}/{net.host}/tcp/{net.port}"],
                announce_maddrs=net.announce_maddrs or None,
                identity_path=self.key_path,
                check_if_identity_free=False,  # hivemind's check assumes RSA keys; ours ran above
                idle_timeout=5,  # if we die before the control connection opens, p2pd follows within 5 s
                no_listen=net.client_mode,
                dht_mode="client" if net.client_mode else "server",
                use_relay=net.use_relay,
                use_auto_relay=net.use_auto_relay,
                startup_timeout=net.startup_timeout,
            )
        except P2PDaemonError as e:
            raise StartupError(self._daemon_error(str(e), peers)) from None
        if self.p2p.peer_id.to_base58() != self.peer_id:
            raise StartupError(f"p2pd runs as {self.p2p.peer_id} instead of {self.peer_id}: {self.key_path} "
                               "is not the identity file it read")
        await self.p2p.add_binary_stream_handler(TIME_PROTOCOL, self._serve_time)
        try:
            self.dht = await DHTNode.create(
                p2p=self.p2p, initial_peers=peers or None, client_mode=net.client_mode,
                record_validator=CompositeValidator([self.validator]), wait_timeout=3, bootstrap_timeout=5,
                cache_locally=False, cache_on_store=False,  # the swarm's records change every round
            )
        except RuntimeError as e:
            raise StartupError(f"cannot reach any initial peer ({', '.join(peers)}): is the bootstrap peer "
                               f"running and reachable from here? ({e})".replace(" (set ensure_bootstrap_success=False to ignore)", "")) from None
        if peers:
            await self._check_clock(peers)
        if not net.client_mode:
            self.maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]
        if net.redial_period > 0:
            from p2pswarm.comm.hivemind.redial import Redialer

            self.redialer = Redialer(self, net.initial_peers, path=Path(net.known_peers) if net.known_peers else None,
                                     period=net.redial_period)
            # Kept: the loop holds its tasks weakly, and a task nobody references is garbage-collected.
            self._redial_task = asyncio.ensure_future(self.redialer.run())  # cancelled in _shutdown

    def _daemon_error(self, message: str, peers: list[str]) -> str:
        low = message.lower()
        if "bootstrap" in low or "failed to dial" in low or "no addresses" in low:
            return (f"cannot reach any initial peer ({', '.join(peers)}): is the bootstrap peer running and "
                    "reachable from here?")
        if "address already in use" in low:
            return f"port {self.net.port} on {self.net.host} is already in use: choose another with --port"
        return f"the p2p daemon did not start: {message.splitlines()[0][:300]}"

    async def _check_identity_free(self, peers: list[str], unreachable_ok: bool = False) -> None:
        """Dial our own peer id from a throwaway peer: if someone answers, this identity is running elsewhere."""
        from hivemind.p2p import P2P, PeerID
        from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError

        try:
            anon = await P2P.create(initial_peers=peers, dht_mode="client", no_listen=True, idle_timeout=5,
                                    startup_timeout=self.net.startup_timeout)
        except P2PDaemonError as e:
            if unreachable_ok:
                return
            raise StartupError(self._daemon_error(str(e), peers)) from None
        try:
            await asyncio.wait_for(anon._client.connect(PeerID.from_base58(self.peer_id), []), timeout=5)
            taken = True
        except (ControlFailure, asyncio.TimeoutError):
            taken = False
        finally:
            await anon.shutdown()
        if taken:
            raise StartupError(f"identity {self.key_path} ({self.peer_id}) is already used by a running peer: "
                               "stop that peer, or give this one its own --identity file")

    async def _serve_time(self, _info, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from hivemind.p2p import P2P

        try:
            await P2P.send_raw_data(msgpack.packb(self.clock()), writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def peer_time(self, peer_id: str, timeout: float = 5.0) -> float:
        """The other peer's clock minus ours (from the middle of the round trip)."""
        from hivemind.p2p import P2P, PeerID

        t0 = self.clock()
        _, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), TIME_PROTOCOL), timeout)
        try:
            header = await asyncio.wait_for(reader.readexactly(P2P.HEADER_LEN), timeout)
            if int.from_bytes(header, P2P.BYTEORDER) > 64:
                raise ValueError("time reply too long")
            theirs = msgpack.unpackb(await asyncio.wait_for(reader.readexactly(int.from_bytes(header, P2P.BYTEORDER)), timeout))
        finally:
            writer.close()
        # A finite number (V.Invalid is a ValueError): NaN would pass any skew check, inf overflow it.
        return V.real(theirs, "time reply", 0.0, 1e12) - (t0 + self.clock()) / 2

    async def _check_clock(self, peers: list[str]) -> None:
        for m in peers:
            try:
                self.clock_skew = await self.peer_time(peer_id_of(m))
            except Exception as e:  # noqa: BLE001 - an older or foreign peer; try the next
                log.debug("no time from %s: %s", m, e)
                continue
            if abs(self.clock_skew) > self.net.max_clock_skew:
                raise StartupError(
                    f"this machine's clock is {-self.clock_skew:+.1f} s off the bootstrap peer's ({m}); more than "
                    f"{self.net.max_clock_skew:.0f} s breaks record expiry and the round clock: sync it "
                    "(e.g. `sudo timedatectl set-ntp true`) and start again")
            return

    # ---- stop -------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        """Our p2pd is still running (Ctrl-C in a terminal reaches it too, and it exits at once)."""
        child = getattr(self.p2p, "_child", None)
        return not self._closed and child is not None and child.returncode is None

    async def _shutdown(self) -> None:
        if self.redialer is not None:
            self.redialer.close()
        if self.dht is not None and self.alive():
            try:  # bounded: over a dead daemon connection this would wait for minutes
                await asyncio.wait_for(self.dht.shutdown(), 2)
            except Exception as e:  # noqa: BLE001
                log.debug("DHT shutdown: %s", e)
        if self.p2p is not None:
            try:
                await asyncio.wait_for(self.p2p.shutdown(), 5)
            except Exception as e:  # noqa: BLE001
                log.debug("p2p shutdown: %s", e)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:  # the DHT's refresh loops; cancelled so the loop stops without warnings
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    def close(self) -> None:
        if self._closed:
            return
        if self._thread.is_alive():
            try:
                self.call(self._shutdown(), timeout=10)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.debug("p2p shutdown: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        self._closed = True

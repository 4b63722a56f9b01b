"""FolderComm: the swarm's rollouts through the shared folder.

publish(r, s): write this node's signed wire bytes to rollouts/round_r/stage_s/<node>.msgpack and refresh
               its registration (the round and stage it plays).
collect(r, s): poll that stage folder, with back-off, until `collect_need` batches are valid (every live
               node not already past round r, plus the peers a bridge among them relays; or
               `collect_peers`) or the deadline passes. A file is accepted only through the core's
               Inbox, signed by the peer id its node registered (or, for a bridge's `<node>~<peer id>`
               file, by that peer id); anything else is skipped and counted (under that sender, when the
               file has a registered node).
Each file is read once (a cache keyed by name, size and modification time), to keep a real Drive
mount's API use low.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from p2pswarm import validate as V
from p2pswarm import wire
from p2pswarm.comm.core import MAX_RELAYED_ORIGINS, Progress, SignedTransport, collect_need
from p2pswarm.comm.drive.records import MAX_IGNORING, Registration, parse_registration, registration_record
from p2pswarm.comm.drive.store import FolderStore, safe_name
from p2pswarm.components import PeerInfo
from p2pswarm.identity import Identity
from p2pswarm.types import Group

log = logging.getLogger(__name__)


def _is_peer_id(s: str) -> bool:
    try:
        V.peer_id(s, "origin")
        return True
    except V.Invalid:
        return False


class FolderComm(SignedTransport):
    """A node of a Drive-mode swarm: its registration and heartbeat, publish / relay, collect, and the
    other nodes' registrations (`registrations`, `live`) for the round clock.

    A heartbeat thread rewrites this node's registration every peer_timeout / 4 (at most 5 s), so that
    the others see it live; `set_position` writes it at once when the round, stage or finished round
    changes. close() marks the node `left`, then runs the close callbacks (the round clock, the mirror).
    """

    def __init__(self, url: str, identity: Identity, swarm: str, *, name: str = "", timeout: float = 10.0,
                 want_peers: int = 0, poll: float = 2.0, peer_timeout: float = 60.0, role: str = "worker",
                 limits: wire.Limits = wire.Limits()):
        super().__init__(identity, swarm, name=name, timeout=timeout, want_peers=want_peers, limits=limits)
        self.store = FolderStore(url, swarm)
        self.node = safe_name(self.name)
        self.poll = poll
        self.peer_timeout = peer_timeout
        self.role = role
        self.files_read = 0
        self.position = {"round": -1, "stage": 0, "finished": -1}
        self._cache: dict[str, tuple[int, Any]] = {}  # rollout path -> (size, mtime) already handled
        self._relays: dict[tuple[int, int, str], set[str]] = {}  # (round, stage, bridge node) -> origins read
        self._regs: dict[str, Registration] = {}
        self._reg_keys: dict[str, tuple[int, Any]] = {}  # node -> (size, mtime) of the file last parsed
        self._pins: dict[str, str] = {}  # node -> peer id first seen (a later different key is refused)
        self._regs_lock = threading.Lock()  # the game thread and the round clock's thread both read them
        self._write_lock = threading.Lock()  # the heartbeat thread and the round both write our files
        self._closed = threading.Event()
        self.heartbeat()
        self._hb_interval = max(0.05, min(5.0, peer_timeout / 4))
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.node}", daemon=True)
        self._hb_thread.start()

    # ---- this node's registration -------------------------------------------------------------------------
    def heartbeat(self, left: bool = False) -> None:
        reg = Registration(self.node, self.peer_id, self.name, self.role, self.position["round"],
                           self.position["stage"], time.time(), left, self.position["finished"], self.bridged,
                           tuple(self.ledger.banned_now()[:MAX_IGNORING]))
        with self._write_lock:
            try:
                self.store.write_atomic(self.store.peer_path(self.node), registration_record(self.identity, reg))
            except OSError as e:
                log.warning("heartbeat to %s failed: %s", self.store.base, e)

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self._hb_interval):
            self.heartbeat()

    def set_position(self, **fields: int) -> None:
        """Update this node's round, stage or finished round, and say so in its registration now."""
        self.position.update(fields)
        self.heartbeat()

    @property
    def progress(self) -> Progress:
        """What this node's registration says about its rounds, from memory (never a stale read)."""
        return Progress(self.position["round"], self.position["finished"])

    # ---- the others' registrations -----------------------------------------------------------------------
    def registrations(self) -> dict[str, Registration]:
        """node -> its latest valid registration, this node's own included (a snapshot; files are re-read
        only when they changed). A registration under a node name first seen with another peer id is refused."""
        folder = self.store.path("peers")
        with self._regs_lock:
            regs = dict(self._regs)  # replaced whole, so that peers() reads it without waiting for the folder
            for fname, size, mtime in self.store.listing(folder):
                if not fname.endswith(".json"):
                    continue
                node = fname[: -len(".json")]
                if self._reg_keys.get(node) == (size, mtime):
                    continue
                self._reg_keys[node] = (size, mtime)
                reg = parse_registration(node, self.store.read_json(f"{folder}/{fname}"))
                if reg is None:
                    self.inbox.drops["bad_registration"] += 1  # unsigned: nobody to count it against
                    continue
                if self._pins.setdefault(node, reg.peer_id) != reg.peer_id:
                    self.drop(reg.peer_id, "registration_conflict")
                    continue
                regs[node] = reg
                self.names[reg.peer_id] = reg.name
            self._regs = regs
            return regs

    def live(self, regs: dict[str, Registration] | None = None) -> dict[str, Registration]:
        """Other nodes whose heartbeat is younger than peer_timeout and who have not left (`regs`: the
        registrations to look at; by default read them now)."""
        regs = self.registrations() if regs is None else regs
        now = time.time()
        return {n: r for n, r in regs.items() if n != self.node and r.is_live(now, self.peer_timeout)}

    def live_peers(self) -> set[str]:
        return {r.peer_id for r in self.live().values()}

    # ---- publish ------------------------------------------------------------------------------------------
    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        data = self.encode(round, stage, groups)
        with self._write_lock:
            self.store.write_atomic(self.store.rollout_path(round, stage, self.node), data)
        self.set_position(round=round, stage=stage)
        self.count_sent(data)

    def relay(self, round: int, stage: int, origin: str, data: bytes) -> None:
        """Write another peer's signed batch as `<this node>~<its peer id>.msgpack` (a bridge from the DHT
        side); readers check the signature against that peer id, so a bridge cannot alter what it passes on."""
        path = f"{self.store.stage_dir(round, stage)}/{self.node}~{safe_name(origin)}.msgpack"
        with self._write_lock:
            self.store.write_atomic(path, data)
        self.relayed += 1

    # ---- collect ------------------------------------------------------------------------------------------
    def collect(self, round: int, stage: int) -> list[Group]:
        """Valid batches from the other live nodes until `collect_need` of them delivered, or the timeout.
        Polls with back-off; invalid files are counted and never count toward the quorum."""
        t0 = self.begin_collect(round)
        deadline = t0 + self.timeout
        for path in [p for p in self._cache if f"/round_{round - 3}/" in p or f"/round_{round - 4}/" in p]:
            del self._cache[path]  # out of the round window: never read again
        self._relays = {k: v for k, v in self._relays.items() if k[0] >= round - 2}
        valid: set[str] = set()
        groups: list[Group] = []
        delay = self.poll
        while not self._closed.is_set():
            regs = self.registrations()
            if self._scan(round, stage, regs, valid, groups):
                delay = self.poll
            # A live node already past this round (it joined late and skipped it) will not publish it.
            live = [r for r in self.live(regs).values() if r.round <= round and not self.ledger.banned(r.peer_id)]
            need = collect_need(want_peers=self.want_peers, live=len(live), bridged=sum(r.bridged for r in live))
            now = time.monotonic()
            if len(valid) >= need or now >= deadline:
                break
            self._closed.wait(min(delay, deadline - now))
            delay = min(delay * 1.5, 4 * self.poll)
        self.end_collect(t0)
        return groups

    def _scan(self, round: int, stage: int, regs: dict[str, Registration], valid: set[str],
              groups: list[Group]) -> bool:
        """Read the stage folder's new files into `valid` (their stems) and `groups`; True if anything new
        was found."""
        folder = self.store.stage_dir(round, stage)
        found = False
        for fname, size, mtime in self.store.listing(folder):
            if not fname.endswith(".msgpack"):
                continue
            stem = fname[: -len(".msgpack")]
            node, _, origin = stem.partition("~")  # "<bridge>~<peer id>": a bridge relays that peer's batch
            path = f"{folder}/{fname}"
            if node == self.node or stem in valid or self._cache.get(path) == (size, mtime):
                continue
            reg = regs.get(node)
            if reg is None:  # its registration may not have synced yet: look again next poll, count once
                if path not in self._cache:
                    self.inbox.drops["unregistered"] += 1
                    self._cache[path] = (-1, None)
                continue
            found = True
            self._cache[path] = (size, mtime)
            if origin and not _is_peer_id(origin):  # a file name is anyone's to choose: never a per-peer key as is
                self.drop(reg.peer_id, "bad_file_name")
                continue
            sender, via = (origin, reg.peer_id) if origin else (reg.peer_id, None)
            if self.ledger.banned(reg.peer_id):
                self.drop(reg.peer_id, "banned")
                continue
            if origin:  # a bridge's relay: bounded per bridge, whatever it writes
                relays = self._relays.setdefault((round, stage, node), set())
                if origin not in relays and len(relays) >= max(1, min(reg.bridged, MAX_RELAYED_ORIGINS)):
                    self.drop(reg.peer_id, "relay_limit")
                    continue
                relays.add(origin)
            if size > self.limits.max_bytes:
                self.drop(via or sender, "too_large")
                continue
            data = self.store.read(path, self.limits.max_bytes)  # it may have grown since the listing
            if data is None:
                self._cache.pop(path, None)  # vanished between listing and reading (or grew past the cap)
                continue
            self.files_read += 1
            batch = self.accept(data, round=round, stage=stage, sender=sender, via=via)
            if batch is not None:
                valid.add(stem)
                groups.extend(batch.groups)
                if not origin:
                    self.pass_on(round, stage, batch, data)
        return found

    # ---- reporting ----------------------------------------------------------------------------------------
    def peers(self) -> list[PeerInfo]:
        """The other live nodes as of the last registrations read (no folder access: the UI polls this)."""
        return [self.peer_info(r.peer_id, r.name, r.round, r.time) for r in self.live(self._regs).values()]

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "files_read": self.files_read, "batches_relayed": self.relayed}

    # ---- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._hb_thread.join(timeout=5)
        self.heartbeat(left=True)
        self.run_close_callbacks()

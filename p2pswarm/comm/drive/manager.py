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

Mixed experiments (nodes of the rl-swarm Drive fork in the same folder, comm/drive/fork.py): the fork's
files are unsigned, so with `trust_folder` off (the default) its registrations and `.json` rollouts are
skipped and counted (`dropped_unsigned_fork`, one warning per fork node). With it on, a fork node is a
member like any other: its `.json` rollouts are collected (re-scored locally like every swarm group, against
the answer its file carries: there is no recipe to re-derive), collects wait for it while it is live, and
the round clock counts it as finished with a round once it submitted its reward for it; and this node
writes a `.json` copy of what it publishes, in the fork's format, beside its `.msgpack`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from p2pswarm import validate as V
from p2pswarm import wire
from p2pswarm.comm.core import MAX_RELAYED_ORIGINS, Progress, SignedTransport, collect_need
from p2pswarm.comm.drive.fork import (ForkPeer, fork_peer_id, fork_rollouts_record, looks_like_fork_peer,
                                      parse_fork_peer, parse_fork_rollouts, parse_fork_submission)
from p2pswarm.comm.drive.records import MAX_IGNORING, Registration, parse_registration, registration_record
from p2pswarm.comm.drive.store import FolderStore, parse_json, round_of, safe_name
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
                 limits: wire.Limits = wire.Limits(), trust_folder: bool = False):
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
        self.trust_folder = trust_folder
        self._forks: dict[str, ForkPeer] = {}  # node -> its valid fork registration
        self._fork_progress: dict[str, list] = {}  # node -> [round it played, round it submitted, last file time]
        self._fork_keys: dict[str, tuple[int, Any]] = {}  # reward submission path -> (size, mtime) read
        self._unsigned: set[str] = set()  # fork nodes refused while trust_folder is off
        self._fork_warned: set[str] = set()
        if trust_folder:
            log.warning("drive_trust_folder is on: unsigned rollouts of rl-swarm fork nodes in %s are trained on, "
                        "their answers trusted; a .json copy of this node's rollouts is written for them", self.store.base)
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
                obj = self.store.read_json(f"{folder}/{fname}")
                reg = parse_registration(node, obj)
                if reg is None:
                    if looks_like_fork_peer(obj):
                        self._see_fork_peer(node, obj)
                    else:
                        self.inbox.drops["bad_registration"] += 1  # unsigned: nobody to count it against
                    continue
                if self._pins.setdefault(node, reg.peer_id) != reg.peer_id:
                    self.drop(reg.peer_id, "registration_conflict")
                    continue
                self._forks.pop(node, None)
                regs[node] = reg
                self.names[reg.peer_id] = reg.name
            if self.trust_folder and self._forks:
                self._read_fork_submissions()
                for node, fork in self._forks.items():
                    if regs.get(node) is None or regs[node].fork:  # a signed registration of the name wins
                        regs[node] = self._fork_registration(fork)
            self._regs = regs
            return regs

    # ---- the fork's nodes (comm/drive/fork.py) -------------------------------------------------------------
    def _see_fork_peer(self, node: str, obj: Any) -> None:
        peer = fork_peer_id(node)
        self.names[peer] = node
        if not self.trust_folder:
            self._unsigned.add(node)
            self._refuse_fork(node, peer)
            return
        try:
            fork = parse_fork_peer(node, obj)
        except V.Invalid as e:
            self.drop(peer, "bad_registration")
            log.debug("fork registration %s: %s", node, e)
            return
        if node not in self._forks and node not in self._fork_warned:
            self._fork_warned.add(node)
            log.info("rl-swarm fork node %s (%s) joined: unsigned, trusted by drive_trust_folder", node, fork.role)
        self._forks[node] = fork

    def _refuse_fork(self, node: str, peer: str) -> None:
        self.drop(peer, "unsigned_fork")
        self.names[peer] = node
        if node not in self._fork_warned:
            self._fork_warned.add(node)
            log.warning("ignoring rl-swarm fork node %s: its files are unsigned (set drive_trust_folder if "
                        "everyone who writes to this folder is trusted)", node)

    def _note_fork(self, node: str, *, round: int = -1, finished: int = -1, at: float = 0.0) -> None:
        p = self._fork_progress.setdefault(node, [-1, -1, 0.0])
        p[0], p[1], p[2] = max(p[0], round), max(p[1], finished), max(p[2], at)

    def _fork_registration(self, fork: ForkPeer) -> Registration:
        round, finished, at = self._fork_progress.get(fork.node, (-1, -1, 0.0))
        return Registration(fork.node, fork_peer_id(fork.node), fork.node, fork.role, max(round, finished), 0,
                            max(fork.registered_at, at), False, finished, fork=True)

    def _read_fork_submissions(self) -> None:
        """The fork nodes' reward submissions of the two newest rounds in rewards/: a fork node submits round R
        once it collected it, right before it trains on it, so the round clock counts it as finished."""
        rounds = sorted(r for r in map(round_of, self.store.subfolders(self.store.path("rewards"))) if r is not None)
        keys: dict[str, tuple[int, Any]] = {}
        for r in rounds[-2:]:
            folder = self.store.path("rewards", f"round_{r}", "stage_0")
            for fname, size, mtime in self.store.listing(folder):
                node, path = fname[: -len(".json")], f"{folder}/{fname}"
                if not fname.endswith(".json") or node not in self._forks:
                    continue
                keys[path] = (size, mtime)
                if self._fork_keys.get(path) == (size, mtime):
                    continue
                try:
                    at = parse_fork_submission(node, r, self.store.read_json(path))
                except V.Invalid as e:
                    self.drop(fork_peer_id(node), "bad_submission")
                    log.debug("fork submission %s: %s", path, e)
                    continue
                self._note_fork(node, finished=r, at=at)
        self._fork_keys = keys

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
            if self.trust_folder:  # the fork's workers read only .json rollouts
                self.store.write_atomic(f"{self.store.stage_dir(round, stage)}/{self.node}.json",
                                        fork_rollouts_record(self.node, round, stage, groups))
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
            if fname.endswith(".json"):
                found |= self._scan_fork(round, stage, folder, fname, size, mtime, regs, valid, groups)
                continue
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

    def _scan_fork(self, round: int, stage: int, folder: str, fname: str, size: int, mtime: Any,
                   regs: dict[str, Registration], valid: set[str], groups: list[Group]) -> bool:
        """Read one `.json` rollout file of the stage folder (see _scan); True if it was new."""
        node, path = fname[: -len(".json")], f"{folder}/{fname}"
        if node == self.node or node in valid or self._cache.get(path) == (size, mtime):
            return False
        reg = regs.get(node)
        if reg is not None and not reg.fork:  # one of ours writing its copy for the fork: its .msgpack counts
            self._cache[path] = (size, mtime)
            return False
        if node not in self._forks and node not in self._unsigned:
            if path not in self._cache:  # its registration may not have synced yet: look again next poll
                self.inbox.drops["unregistered"] += 1
                self._cache[path] = (-1, None)
            return False
        self._cache[path] = (size, mtime)
        peer = fork_peer_id(node)
        if not self.trust_folder:
            self._refuse_fork(node, peer)
            return True
        if self.ledger.banned(peer):
            self.drop(peer, "banned")
            return True
        if size > self.limits.max_bytes:
            self.drop(peer, "too_large")
            return True
        data = self.store.read(path, self.limits.max_bytes)
        if data is None:
            self._cache.pop(path, None)
            return False
        self.files_read += 1
        try:
            obj = parse_json(data)
            if obj is None:
                raise V.Invalid("rollout file", "not a JSON object")
            batch = parse_fork_rollouts(node, round, stage, obj, self.limits)
        except Exception as e:  # noqa: BLE001 - V.Invalid, or a check this parser forgot: never the round's
            self.drop(peer, V.refusal(e))
            log.debug("fork rollouts %s: %s", path, e)
            return True
        self._note_fork(node, round=round, at=batch.time)
        with self._accept_lock:
            stats = self.per_peer[peer]
            stats["batches"] += 1
            stats["groups"] += len(batch.groups)
            stats["bytes"] += len(data)
            self.inbox.received += 1
            self.inbox.bytes_received += len(data)
            self.inbox.groups_from[peer] += len(batch.groups)
            self.ledger.good(peer)
        valid.add(node)
        groups.extend(batch.groups)
        return True

    # ---- reporting ----------------------------------------------------------------------------------------
    def peers(self) -> list[PeerInfo]:
        """The other live nodes as of the last registrations read (no folder access: the UI polls this)."""
        peers = [self.peer_info(r.peer_id, r.name, r.round, r.time) for r in self.live(self._regs).values()]
        # Fork nodes seen but refused: shown (the UI's peer table), with why nobody trains on them.
        return peers + [PeerInfo(fork_peer_id(n), n, ignored="unsigned rl-swarm fork node: drive_trust_folder is off")
                        for n in sorted(self._unsigned) if n not in self._regs]

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

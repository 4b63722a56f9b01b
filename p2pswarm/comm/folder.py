"""Drive mode: the swarm through a shared folder (Google Drive in Colab, an rclone mount, NFS, any fsspec URL).

    <root>/experiments/<name>/state/current_state.json              round clock (the coordinator writes it)
    <root>/experiments/<name>/peers/<node>.json                      registration + heartbeat (signed)
    <root>/experiments/<name>/rollouts/round_R/stage_S/<node>.msgpack  the signed wire bytes (p2pswarm.wire)
    <root>/experiments/<name>/archive/rollouts/round_R/              old rounds, when archiving is on

Every file has exactly one writer and is written atomically (a temporary name in the same folder, then a
rename), so a reader sees the old file or the new one, never half of one. Readers still distrust what they
find: a rollout file is accepted only through wire.Inbox (signature, peer id = the one its node registered,
swarm, round window, size), and a registration only with a valid signature. Anything else is counted by
reason and skipped; nothing a file contains can raise into the round. Each file is read once (a local cache
keyed by name, size and modification time), and polls back off, to keep a real Drive mount's API use low.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from p2pswarm import wire
from p2pswarm.components import CommunicationManager, Coordinator, PeerInfo
from p2pswarm.identity import Identity, peer_id_from_public, verify

log = logging.getLogger(__name__)

_counter = itertools.count()
_ROUND_RE = re.compile(r"^round_(\d+)$")


def safe_name(name: str) -> str:
    """A node name as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return out or "node"


class FolderStore:
    """The experiment's folder through fsspec: atomic writes, listings with size/mtime, bounded reads."""

    def __init__(self, url: str, experiment: str):
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"
        self.base = f"{self.root}/experiments/{experiment}"

    def path(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def state_path(self) -> str:
        return self.path("state", "current_state.json")

    def peer_path(self, node: str) -> str:
        return self.path("peers", f"{safe_name(node)}.json")

    def round_dir(self, round: int) -> str:
        return self.path("rollouts", f"round_{round}")

    def stage_dir(self, round: int, stage: int) -> str:
        return f"{self.round_dir(round)}/stage_{stage}"

    def rollout_path(self, round: int, stage: int, node: str) -> str:
        return f"{self.stage_dir(round, stage)}/{safe_name(node)}.msgpack"

    # ---- writing ----------------------------------------------------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> None:
        """Write under a temporary name in the same folder, then rename over `path`."""
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{os.getpid()}.{next(_counter)}.tmp"
        if self.local:
            os.makedirs(parent, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        self.fs.makedirs(parent, exist_ok=True)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        finally:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except OSError:
                pass

    # ---- reading ----------------------------------------------------------------------------------------
    def listing(self, folder: str) -> list[tuple[str, int, Any]]:
        """(name, size, mtime) of the plain files in `folder` that are not temporaries; [] if it is missing."""
        try:
            if not self.local:
                self.fs.invalidate_cache(folder)
            entries = self.fs.ls(folder, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            log.debug("listing %s failed: %s", folder, e)
            return []
        out = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") != "file" or name.startswith(".") or name.endswith(".tmp"):
                continue
            mtime = e.get("mtime", e.get("created", e.get("LastModified", e.get("updated"))))
            out.append((name, int(e.get("size") or 0), str(mtime)))
        return out

    def subfolders(self, folder: str) -> list[str]:
        try:
            if not self.local:
                self.fs.invalidate_cache(folder)
            return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(folder, detail=True)
                    if e.get("type") == "directory"]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            log.debug("reading %s failed: %s", path, e)
            return None

    def read_json(self, path: str) -> dict | None:
        data = self.read(path)
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        return obj if isinstance(obj, dict) else None

    # ---- the round clock --------------------------------------------------------------------------------
    def read_clock(self) -> dict | None:
        state = self.read_json(self.state_path())
        if state is None or not isinstance(state.get("round"), int) or state["round"] < 0:
            return None
        return state


# ---- registrations / heartbeats (signed, so nobody can speak for another node) --------------------------
def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def signed_record(identity: Identity, fields: dict) -> bytes:
    body = {**fields, "peer_id": identity.peer_id, "key": identity.public.hex()}
    return json.dumps({**body, "sig": identity.sign(_canonical(body)).hex()}, indent=1).encode()


def check_record(obj: dict | None) -> dict | None:
    """The record if its signature and peer id hold, else None."""
    if not isinstance(obj, dict):
        return None
    try:
        body = {k: v for k, v in obj.items() if k != "sig"}
        key, sig = bytes.fromhex(obj["key"]), bytes.fromhex(obj["sig"])
        if len(key) != 32 or peer_id_from_public(key) != obj.get("peer_id") or not verify(key, sig, _canonical(body)):
            return None
        if not isinstance(obj.get("time"), (int, float)):
            return None
    except (KeyError, ValueError, TypeError):
        return None
    return obj


@dataclass
class Registration:
    node: str  # the file stem in peers/ and rollouts/
    peer_id: str
    name: str
    role: str
    round: int
    stage: int
    time: float
    left: bool
    finished: int = -1  # the last round the node trained (the clock waits for this, not for publishing)
    bridged: int = 0  # peers on the other side of a bridge (comm=hybrid) whose batches this node relays


class FolderComm(CommunicationManager):
    """Publish = write this node's file for (round, stage); collect = poll the stage folder for the others'."""

    def __init__(self, url: str, identity: Identity, swarm: str, *, name: str = "", timeout: float = 10.0,
                 want_peers: int = 0, poll: float = 2.0, peer_timeout: float = 60.0, role: str = "worker",
                 limits: wire.Limits = wire.Limits()):
        self.store = FolderStore(url, swarm)
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.name = name or identity.name
        self.node = safe_name(self.name)
        self.timeout = timeout
        self.want_peers = want_peers
        self.poll = poll
        self.peer_timeout = peer_timeout
        self.role = role
        self.limits = limits
        self.inbox = wire.Inbox(swarm, limits)
        self.sent = 0
        self.bytes_sent = 0
        self.files_read = 0
        self.last_collect_seconds = 0.0
        self.round, self.stage = -1, 0
        self._cache: dict[str, tuple[int, Any]] = {}  # rollout path -> (size, mtime) already handled
        self._regs: dict[str, Registration] = {}
        self._reg_keys: dict[str, tuple[int, Any]] = {}
        self._pins: dict[str, str] = {}  # node -> peer id first seen (a later different key is refused)
        self.bridged = 0  # set by a bridge: how many peers of the other side it relays
        self.finished = -1
        self._write_lock = threading.Lock()
        self._closed = threading.Event()
        self._closers: list = []
        self.on_accept = None  # callable(round, stage, peer, data): a bridge relays what this side accepted
        self.relayed = 0
        self.heartbeat()
        self._hb_interval = max(0.05, min(5.0, peer_timeout / 4))
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.node}", daemon=True)
        self._hb_thread.start()

    # ---- heartbeat --------------------------------------------------------------------------------------
    def heartbeat(self, left: bool = False) -> None:
        fields = {"name": self.name, "node": self.node, "role": self.role, "round": self.round,
                  "stage": self.stage, "time": time.time(), "left": left, "finished": self.finished,
                  "bridged": self.bridged}
        with self._write_lock:
            try:
                self.store.write_atomic(self.store.peer_path(self.node), signed_record(self.identity, fields))
            except OSError as e:
                log.warning("heartbeat to %s failed: %s", self.store.base, e)

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self._hb_interval):
            self.heartbeat()

    # ---- registrations ----------------------------------------------------------------------------------
    def registrations(self) -> dict[str, Registration]:
        """node -> its latest valid registration (files re-read only when they changed)."""
        folder = self.store.path("peers")
        for fname, size, mtime in self.store.listing(folder):
            if not fname.endswith(".json"):
                continue
            node = fname[: -len(".json")]
            if self._reg_keys.get(node) == (size, mtime):
                continue
            rec = check_record(self.store.read_json(f"{folder}/{fname}"))
            self._reg_keys[node] = (size, mtime)
            if rec is None or safe_name(str(rec.get("node", node))) != node:
                self.inbox.drops["bad_registration"] += 1
                continue
            pinned = self._pins.setdefault(node, rec["peer_id"])
            if pinned != rec["peer_id"]:
                self.inbox.drops["registration_conflict"] += 1
                continue
            try:
                self._regs[node] = Registration(node, rec["peer_id"], str(rec.get("name", node)), str(rec.get("role", "")),
                                                int(rec.get("round", -1)), int(rec.get("stage", 0)), float(rec["time"]),
                                                bool(rec.get("left", False)), int(rec.get("finished", -1)),
                                                min(max(int(rec.get("bridged", 0)), 0), 1024))
            except (TypeError, ValueError):
                self.inbox.drops["bad_registration"] += 1
        return self._regs

    def live(self, regs: dict[str, Registration] | None = None) -> dict[str, Registration]:
        """Other nodes whose heartbeat is younger than peer_timeout and who have not left."""
        regs = self.registrations() if regs is None else regs
        now = time.time()
        return {n: r for n, r in regs.items()
                if n != self.node and not r.left and now - r.time <= self.peer_timeout}

    # ---- publish / collect ------------------------------------------------------------------------------
    def publish(self, round: int, stage: int, groups) -> None:
        data = wire.encode(wire.RolloutBatch(self.swarm, round, stage, self.peer_id, groups), self.identity)
        with self._write_lock:
            self.store.write_atomic(self.store.rollout_path(round, stage, self.node), data)
        self.round, self.stage = round, stage
        self.heartbeat()
        self.sent += 1
        self.bytes_sent += len(data)

    def relay(self, round: int, stage: int, origin: str, data: bytes) -> None:
        """Write another peer's signed batch as `<this node>~<its peer id>.msgpack` (a bridge from the DHT
        side); readers check the signature against that peer id, so a bridge cannot alter what it passes on."""
        path = f"{self.store.stage_dir(round, stage)}/{self.node}~{safe_name(origin)}.msgpack"
        with self._write_lock:
            self.store.write_atomic(path, data)
        self.relayed += 1

    def _scan(self, round: int, stage: int, regs: dict[str, Registration], valid: set[str], groups: list) -> bool:
        """Read new files of the stage folder; True if anything new was found."""
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
            if size > self.limits.max_bytes:
                self.inbox.drops["too_large"] += 1
                continue
            data = self.store.read(path)
            if data is None:
                self._cache.pop(path, None)  # vanished between listing and reading
                continue
            self.files_read += 1
            batch = self.inbox.accept(data, current_round=round, expect_peer=origin or reg.peer_id, slot=(round, stage))
            if batch is not None:
                valid.add(stem)
                groups.extend(batch.groups)
                if not origin and self.on_accept is not None:  # relayed batches are not passed on again
                    try:
                        self.on_accept(round, stage, batch.peer, data)
                    except Exception as e:  # noqa: BLE001 - the other side's trouble is not this round's
                        log.warning("relaying %s's batch: %s", batch.peer[-8:], e)
        return found

    def collect(self, round: int, stage: int):
        """Valid batches from other live nodes until `want_peers` of them (or all live ones) delivered,
        or the timeout. Polls with back-off; invalid files are counted and never count toward the quorum."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        self.inbox.forget_before(round - 2)
        for path in [p for p in self._cache if f"/round_{round - 3}/" in p or f"/round_{round - 4}/" in p]:
            del self._cache[path]
        valid: set[str] = set()
        groups: list = []
        delay = self.poll
        while not self._closed.is_set():
            regs = self.registrations()
            if self._scan(round, stage, regs, valid, groups):
                delay = self.poll
            # A live node already past this round (it joined late and skipped it) will not publish it.
            live = {n: r for n, r in self.live(regs).items() if r.round <= round}
            need = self.want_peers or len(live) + sum(r.bridged for r in live.values())
            now = time.monotonic()
            if len(valid) >= need or now >= deadline:
                break
            self._closed.wait(min(delay, deadline - now))
            delay = min(delay * 1.5, 4 * self.poll)
        self.last_collect_seconds = time.monotonic() - t0
        return groups

    def peers(self) -> list[PeerInfo]:
        now = time.time()
        return [PeerInfo(r.peer_id, r.name, r.round, r.time, self.inbox.groups_from[r.peer_id])
                for n, r in self._regs.items() if n != self.node and not r.left and now - r.time <= self.peer_timeout]

    def counters(self) -> dict[str, int]:
        return {"batches_sent": self.sent, "bytes_sent": self.bytes_sent, "files_read": self.files_read,
                "batches_relayed": self.relayed,
                **self.inbox.counters()}

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for close in self._closers:
            close()
        self._hb_thread.join(timeout=5)
        self.heartbeat(left=True)


class FolderCoordinator(Coordinator):
    """The round clock in state/current_state.json.

    Every node follows it: the next round is max(finished + 1, clock), so a node that joins late or fell
    behind jumps ahead (GameManager logs the skipped rounds); a fast node is never held back by it.
    A node with role 'coordinator' also keeps it (one per experiment): a background thread advances the
    clock when a quorum of live nodes has finished (trained) the round, or when `deadline` seconds
    passed and at least one node has finished the round; it persists the clock and never rewinds it
    (restarts read it back), and it is the janitor that retires old rounds.
    """

    def __init__(self, comm: FolderComm, *, role: str = "worker", quorum: int = 0,
                 deadline: float = 300.0, keep_rounds: int = 0, archive: bool = False):
        self.comm, self.store = comm, comm.store
        self.role = role
        self.quorum = quorum
        self.deadline = deadline
        self.keep_rounds = keep_rounds
        self.archive = archive
        self.clock = -1
        self.clock_started = time.time()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if role == "coordinator":
            state = self.store.read_clock()
            if state is None:
                self._write_clock(0)
                log.info("round clock started at round 0 in %s", self.store.base)
            else:
                self.clock = state["round"]
                self.clock_started = float(state.get("started", time.time()))
                log.info("round clock resumed at round %d (persisted in %s)", self.clock, self.store.state_path())
            self._thread = threading.Thread(target=self._loop, name="round-clock", daemon=True)
            self._thread.start()
            comm._closers.append(self.close)

    # ---- every node --------------------------------------------------------------------------------------
    def current(self) -> int:
        """The clock as last read (never lower than a clock seen before)."""
        if self.role != "coordinator":
            state = self.store.read_clock()
            if state is not None:
                self.clock = max(self.clock, state["round"])
        return max(self.clock, 0)

    def start_round(self, resume_from: int) -> int:
        return max(resume_from, self.current())

    def next_round(self, finished: int) -> int:
        self.comm.finished = finished
        self.comm.heartbeat()  # the clock advances on finished rounds
        return max(finished + 1, self.current())

    # ---- the coordinator ----------------------------------------------------------------------------------
    def _write_clock(self, round: int) -> None:
        if round < self.clock:
            raise ValueError("the round clock never rewinds")
        self.clock, self.clock_started = round, time.time()
        state = {"round": round, "stage": 0, "started": self.clock_started, "updated": self.clock_started,
                 "coordinator": self.comm.peer_id, "coordinator_name": self.comm.name}
        self.store.write_atomic(self.store.state_path(), json.dumps(state, indent=1).encode())

    def finished_nodes(self, round: int, regs: dict[str, Registration]) -> set[str]:
        """Nodes that trained round `round` (their heartbeat says so). Waiting for publishing alone would
        move the clock while nodes still collect, and a node joining then would skip a round the others
        are still waiting for."""
        return {n for n, r in regs.items() if r.finished >= round}

    def step(self) -> bool:
        """Advance the clock once if the current round is done; True if it moved."""
        regs = self.comm.registrations()
        live = set(self.comm.live(regs))
        if self.comm.node in regs and not regs[self.comm.node].left:
            live.add(self.comm.node)  # the coordinator trains too
        done = self.finished_nodes(self.clock, regs)
        need = max(1, self.quorum or len(live))
        if len(done & live) >= need or (done and time.time() - self.clock_started >= self.deadline):
            self._write_clock(self.clock + 1)
            log.info("round clock advanced to round %d (%d node(s) finished round %d)", self.clock, len(done), self.clock - 1)
            return True
        return False

    def janitor(self) -> None:
        """Retire rounds before clock - keep_rounds: archive (move) them if configured, else delete them.
        A failed archive leaves the round where it is."""
        if self.keep_rounds <= 0:
            return
        for folder in self.store.subfolders(self.store.path("rollouts")):
            m = _ROUND_RE.match(folder)
            if not m or int(m.group(1)) >= self.clock - self.keep_rounds:
                continue
            src = self.store.round_dir(int(m.group(1)))
            try:
                if self.archive:
                    dest_parent = self.store.path("archive", "rollouts")
                    dest = f"{dest_parent}/{folder}"
                    if self.store.local:
                        os.makedirs(dest_parent, exist_ok=True)
                        os.replace(src, dest)
                    else:
                        self.store.fs.makedirs(dest_parent, exist_ok=True)
                        self.store.fs.mv(src, dest, recursive=True)
                else:
                    self.store.fs.rm(src, recursive=True)
            except OSError as e:
                log.warning("could not %s %s (kept): %s", "archive" if self.archive else "delete", src, e)

    def _loop(self) -> None:
        delay = self.comm.poll
        while not self._stop.wait(delay):
            try:
                moved = False
                while self.step():  # catch up at once when several rounds are already done
                    moved = True
                if moved:
                    self.janitor()
                delay = self.comm.poll if moved else min(delay * 1.5, 4 * self.comm.poll)
            except Exception as e:  # noqa: BLE001 - a flaky mount must not kill the clock
                log.warning("round clock: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

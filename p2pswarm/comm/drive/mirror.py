"""Drive mode: a node's logs and checkpoints in the shared folder, and resuming from them.

    <root>/experiments/<name>/logs/<node>/metrics.jsonl, events.jsonl        copies of the run folder's files
                                  (metrics rows with the fork's fields added: forkfiles.py)
    <root>/experiments/<name>/logs/<node>/cumulative_metrics.jsonl, training_events.jsonl,
    <root>/experiments/<name>/progress_<node>.json, rewards/round_R/stage_0/<node>.json
                                                                             what the fork's readers need
    <root>/experiments/<name>/checkpoints/<node>/round_NNNNNN/              model/, trainer.pt, state.json,
                                                                             manifest.json (signed, written last)

The run folder stays the source of truth while the node runs; this mirrors it into the shared folder from a
background thread, never slowing a round: the logs when they changed, at most once per round and once per
`log_interval` (5 x drive_poll_interval), and each checkpoint the node saves (a slow mount coalesces them).
A checkpoint is uploaded into a temporary folder, its signed manifest (size and sha256 of every file)
written last, and the folder renamed into place; the last `keep` are kept.

When a node starts and its run folder has no checkpoint, or an older one than the shared folder (a Colab VM
that died with its disk), the newest shared checkpoint is brought back first, and so are the logs, so that
the node resumes where it was instead of starting over. A checkpoint is restored only if its manifest is
signed by this node's own identity and every file matches it: anyone who can write to the shared folder
could otherwise plant another node's weights (trainer.pt also loads without unpickling: trainer.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path, PurePosixPath

from p2pswarm import events as ev
from p2pswarm import validate as V
from p2pswarm.comm.drive import forkfiles
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.comm.drive.records import manifest_record, parse_manifest
from p2pswarm.comm.drive.store import FolderStore, round_of, safe_name
from p2pswarm.identity import Identity
from p2pswarm.run import RunDir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOG_FILES = ("metrics.jsonl", "events.jsonl")
# Beside the logs: their sizes and sha256, signed by the node, so that a restore adopts only logs it wrote
# (anyone who can write to the folder could otherwise add rows in its name).
LOGS_MANIFEST = "logs.manifest.json"
MAX_LOG_RESTORE_BYTES = 256 << 20
SUBMIT_BACK = 50  # rounds a restarted node still submits its reward for (the fork only reads the current one)


def logs_dir(store: FolderStore, node: str) -> str:
    return store.path("logs", safe_name(node))


def checkpoints_dir(store: FolderStore, node: str) -> str:
    return store.path("checkpoints", safe_name(node))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shared_checkpoints(store: FolderStore, node: str) -> list[int]:
    """Rounds of this node's complete checkpoints in the shared folder (a manifest is written last), sorted."""
    folder = checkpoints_dir(store, node)
    out = []
    for name in store.subfolders(folder):
        r = round_of(name)
        if r is not None and store.fs.exists(f"{folder}/{name}/{MANIFEST}"):
            out.append(r)
    return sorted(out)


class DriveMirror:
    """Listens to a node's events and mirrors its run folder into the shared folder (see the module doc)."""

    def __init__(self, store: FolderStore, identity: Identity, node: str, run: RunDir, keep: int = 3,
                 log_interval: float = 10.0):
        self.store, self.identity, self.node, self.run, self.keep = store, identity, safe_name(node), run, max(1, keep)
        self.log_interval = log_interval  # logs are uploaded at most this often (and always when the node stops)
        self._last_logs = float("-inf")
        self.logs = logs_dir(store, node)
        self.checkpoints = checkpoints_dir(store, node)
        self.uploaded_checkpoints: list[int] = []
        self._sent: dict[str, bytes] = {}  # shared path -> digest of the content last uploaded
        self._submitted: set[int] = set()  # rounds whose reward submission is in the folder
        self.experiment = store.base.rsplit("/", 1)[-1]
        self._cond = threading.Condition()
        self._want_logs = False
        self._want_ckpt: tuple[int, Path] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"drive-mirror-{self.node}", daemon=True)
        self._thread.start()

    # ---- events (called on the game thread: only note the work) -------------------------------------------
    def __call__(self, event: ev.Event) -> None:
        if event.kind == ev.CHECKPOINT_SAVED and event.data.get("path"):
            with self._cond:
                self._want_ckpt = (int(event.data["round"]), Path(event.data["path"]))
                self._want_logs = True
                self._cond.notify()
        elif event.kind in (ev.ROUND_FINISHED, ev.NODE_STOPPED):
            with self._cond:
                self._want_logs = True
                self._cond.notify()

    # ---- the upload thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._want_ckpt or self._closing:
                        break
                    if self._want_logs:
                        left = self._last_logs + self.log_interval - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                if not (self._want_logs or self._want_ckpt):
                    return  # closing, nothing left
                ckpt, self._want_ckpt = self._want_ckpt, None
                logs, self._want_logs = self._want_logs, False
            if ckpt is not None:
                self._guarded(self.upload_checkpoint, *ckpt)
            if logs:
                self._last_logs = time.monotonic()
                self._guarded(self.upload_logs)

    def _guarded(self, upload, *args) -> None:
        try:
            upload(*args)
        except Exception as e:  # noqa: BLE001 - a flaky mount must never stop training
            log.warning("mirroring to %s failed: %s: %s", self.store.base, type(e).__name__, e)

    def close(self) -> None:
        """Upload what is pending (the final checkpoint above all), then stop the thread."""
        with self._cond:
            pending = self._want_ckpt
            self._want_logs = True  # the last events (node stopped) too
            self._closing = True
            self._cond.notify_all()
        if pending is not None:
            log.info("uploading checkpoint of round %d to %s", pending[0], self.checkpoints)
        self._thread.join()

    # ---- uploads ------------------------------------------------------------------------------------------
    def upload_logs(self) -> None:
        """The run folder's logs, and what the fork's readers need beside them (forkfiles.py): every file
        rewritten whole and atomically when its content changed, only under this node's own names."""
        raw = {}
        for name in LOG_FILES:
            try:
                raw[name] = (self.run.path / name).read_bytes()
            except FileNotFoundError:
                continue
        rows, events = forkfiles.own_rows(raw.get("metrics.jsonl")), forkfiles.own_rows(raw.get("events.jsonl"))
        metrics, cumulative = forkfiles.for_fork(rows, self.node, self.experiment)
        training, progress = forkfiles.events_for_fork(events, self.node, self.experiment)
        files = {f"{self.logs}/events.jsonl": raw.get("events.jsonl")}
        if "metrics.jsonl" in raw:
            files.update({f"{self.logs}/{forkfiles.METRICS}": forkfiles.jsonl(metrics),
                          f"{self.logs}/{forkfiles.CUMULATIVE}": forkfiles.jsonl(cumulative)})
        if events:
            files.update({f"{self.logs}/{forkfiles.TRAINING_EVENTS}": forkfiles.jsonl(training),
                          forkfiles.progress_path(self.store, self.node): forkfiles.jsonl(progress)})
        changed = False
        for path, data in files.items():
            if data is None:
                continue
            digest = hashlib.sha256(data).digest()
            if self._sent.get(path) == digest:
                continue
            self.store.write_atomic(path, data)
            self._sent[path] = digest
            changed = True
        restorable = {name: files.get(f"{self.logs}/{name}") for name in LOG_FILES}
        if changed:  # after the files: a crash in between leaves a manifest that matches nothing, not a wrong one
            entries = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                       for name, data in restorable.items() if data is not None}
            if entries:
                last = rows[-1].get("round", 0) if rows else 0
                self.store.write_atomic(f"{self.logs}/{LOGS_MANIFEST}", manifest_record(
                    self.identity, self.node, last if isinstance(last, int) and last >= 0 else 0, entries))
        self._submit_rewards(metrics)

    def _submit_rewards(self, metrics: list[dict]) -> None:
        """rewards/round_R/stage_0/<node>.json for the rounds played (the last SUBMIT_BACK of them after a
        restart), as the fork's nodes submit them: its coordinator counts these. Written once, never over an
        existing file."""
        for row in metrics[-SUBMIT_BACK:]:
            r, reward = row["round"], row.get("my_reward")
            if r in self._submitted or reward is None:
                continue
            path = forkfiles.reward_path(self.store, r, 0, self.node)
            if not self.store.fs.exists(path):
                self.store.write_atomic(path, forkfiles.reward_submission(r, reward, self.node, row.get("timestamp")))
            self._submitted.add(r)

    def upload_checkpoint(self, round: int, local: Path) -> bool:
        """Copy a local checkpoint folder to checkpoints/<node>/round_NNNNNN/; False if it vanished first
        (pruned locally by a newer one, which is queued)."""
        final = f"{self.checkpoints}/{local.name}"
        tmp = f"{self.checkpoints}/.tmp-{local.name}-{os.getpid()}"
        files: dict[str, dict] = {}
        try:
            self._rm(tmp)
            for p in sorted(local.rglob("*")):
                if not p.is_file():
                    continue
                rel = p.relative_to(local).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
                self.store.upload(str(p), f"{tmp}/{rel}")
        except FileNotFoundError:
            self._rm(tmp)
            return False
        if "state.json" not in files:
            self._rm(tmp)
            return False
        manifest = manifest_record(self.identity, self.node, round, files)
        self.store.write_atomic(f"{tmp}/{MANIFEST}", manifest)
        self._rm(final)
        self.store.move(tmp, final)
        self.uploaded_checkpoints.append(round)
        self.prune()
        log.debug("checkpoint of round %d mirrored to %s", round, final)
        return True

    def prune(self) -> None:
        """Keep the last `keep` complete checkpoints; remove older ones and dead uploads' temporaries."""
        for r in shared_checkpoints(self.store, self.node)[: -self.keep]:
            self._rm(f"{self.checkpoints}/round_{r:06d}")
        for name in self.store.subfolders(self.checkpoints):
            if name.startswith(".tmp-"):
                self._rm(f"{self.checkpoints}/{name}")

    def _rm(self, path: str) -> None:
        try:
            self.store.remove(path)
        except OSError as e:
            log.debug("removing %s failed: %s", path, e)

    # ---- resume (before the node starts) ------------------------------------------------------------------
    def restore(self) -> int | None:
        """Bring back the newest shared checkpoint (and the logs) if the run folder has none or an older one;
        the round restored, or None."""
        local = self.run.latest_checkpoint()
        local_round = local[0] if local else -1
        for r in reversed(shared_checkpoints(self.store, self.node)):
            if r <= local_round:
                return None
            if self._download_checkpoint(r):
                self._restore_logs()
                log.info("%s: restored the checkpoint of round %d from %s (the run folder had %s)", self.node, r,
                         self.checkpoints, f"round {local_round}" if local else "none")
                return r
        return None

    def _download_checkpoint(self, round: int) -> bool:
        src = f"{self.checkpoints}/round_{round:06d}"
        man = parse_manifest(self.store.read_json(f"{src}/{MANIFEST}"))
        if man is None or man.round != round:
            log.warning("not restoring %s: its manifest is missing, unsigned, wrongly signed or malformed", src)
            return False
        if man.peer_id != self.identity.peer_id:
            log.warning("not restoring %s: it was signed by %s, and this node is %s. Keep the identity file on "
                        "persistent storage (IDENTITY_PATH) so that a restarted node stays the same peer.",
                        src, man.peer_id, self.identity.peer_id)
            return False
        dest = self.run.checkpoint_path(round)
        tmp = self.run.checkpoints / f".tmp-{dest.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, (size, sha256) in man.files.items():  # names checked by parse_manifest: no .., not absolute
                target = tmp.joinpath(*PurePosixPath(rel).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._copy_capped(f"{src}/{rel}", target, size)  # a swapped-in huge file stops at its size
                if target.stat().st_size != size or _sha256(target) != sha256:
                    raise ValueError(f"{rel} does not match the manifest")
            if not (tmp / "state.json").exists():
                raise ValueError("no state.json")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("not restoring %s: %s", src, e)
            return False
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return True

    def _copy_capped(self, src: str, target: Path, size: int) -> None:
        """Copy `src` to `target`, refusing it (ValueError) as soon as it is longer than `size` bytes."""
        copied = 0
        with self.store.fs.open(src, "rb") as f, open(target, "wb") as out:
            while True:
                chunk = f.read(min(1 << 20, size + 1 - copied))
                if not chunk:
                    return
                copied += len(chunk)
                if copied > size:
                    raise ValueError(f"{src} is longer than its manifest says")
                out.write(chunk)

    def _restore_logs(self) -> None:
        """The shared logs replace local ones that have fewer lines (the run folder was lost): only logs whose
        bytes match the manifest this node signed beside them, and of those only this node's own rows."""
        man = parse_manifest(self.store.read_json(f"{self.logs}/{LOGS_MANIFEST}"))
        if man is None or man.peer_id != self.identity.peer_id:
            log.warning("not restoring the logs in %s: no manifest signed by this node beside them", self.logs)
            return
        for name in LOG_FILES:
            size, sha256 = man.files.get(name, (-1, ""))
            if not 0 < size <= MAX_LOG_RESTORE_BYTES:
                continue
            data = self.store.read(f"{self.logs}/{name}", max_bytes=size)
            if not data or hashlib.sha256(data).hexdigest() != sha256:
                log.warning("not restoring %s/%s: it does not match this node's signed manifest", self.logs, name)
                continue
            rows = []
            for line in data.decode("utf-8", "replace").splitlines():
                try:
                    row = V.json_value(line, nan=True)
                except Exception:  # noqa: BLE001 - Invalid: a line that is not ours
                    continue
                if isinstance(row, dict) and row.get("peer") == self.identity.peer_id:
                    rows.append(line)
            path = self.run.path / name
            have = path.read_text().splitlines() if path.exists() else []
            if len(rows) > len(have):
                tmp = path.with_name(f".{name}.{os.getpid()}.restore")
                tmp.write_text("".join(r + "\n" for r in rows))
                os.replace(tmp, path)


def attach_mirror(comm: FolderComm, run: RunDir, events: ev.EventBus, keep: int = 3) -> DriveMirror:
    """Restore from the shared folder if it is ahead of the run folder, then mirror the node into it.
    Call before the node starts; the mirror uploads what is pending when `comm` closes."""
    mirror = DriveMirror(comm.store, comm.identity, comm.node, run, keep, log_interval=5 * comm.poll)
    try:
        mirror.restore()
    except Exception as e:  # noqa: BLE001 - a missing or flaky mount: start from the run folder
        log.warning("could not look for a checkpoint in %s: %s: %s", mirror.checkpoints, type(e).__name__, e)
    events.subscribe(mirror)
    comm.add_close_callback(mirror.close)
    return mirror

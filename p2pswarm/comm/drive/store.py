"""The experiment's folder through fsspec: the only module that touches the file system.

Every file has exactly one writer and is written atomically (a temporary name in the same folder, then a
rename), so a reader sees the old file or the new one, never half of one. Readers skip temporaries, and
every read is bounded and fails soft (None, or an empty listing): a file that vanished or a mount that
hiccuped is the next poll's business, never an exception in the round.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

_counter = itertools.count()
_ROUND_RE = re.compile(r"^round_(\d+)$")


def safe_name(name: str) -> str:
    """A node name as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return out or "node"


def round_of(folder: str) -> int | None:
    """The round a `round_R` (rollouts) or `round_NNNNNN` (checkpoints) folder name stands for, else None."""
    m = _ROUND_RE.match(folder)
    return int(m.group(1)) if m else None


class FolderStore:
    """One experiment's folder (`<root>/experiments/<name>`): its paths, atomic writes, listings with
    size and modification time, bounded reads, and the round clock as last written.

    A local path goes through os directly (fsync, os.replace: atomic on POSIX and on a Drive mount); any
    other fsspec URL through the file system's own put and move.
    """

    def __init__(self, url: str, experiment: str):
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"
        self.base = f"{self.root}/experiments/{experiment}"

    # ---- the layout -------------------------------------------------------------------------------------
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

    def upload(self, local_path: str, path: str) -> None:
        """Copy a local file to `path` (not atomic: used inside a temporary folder renamed into place)."""
        parent = path.rsplit("/", 1)[0]
        if self.local:
            os.makedirs(parent, exist_ok=True)
            shutil.copyfile(local_path, path)
        else:
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.put_file(local_path, path)

    def move(self, src: str, dest: str) -> None:
        """Rename a file or a whole folder to `dest` (its parent is created); OSError if that fails."""
        parent = dest.rsplit("/", 1)[0]
        if self.local:
            os.makedirs(parent, exist_ok=True)
            os.replace(src, dest)
        else:
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.mv(src, dest, recursive=True)

    def remove(self, path: str) -> None:
        """Delete a file or a whole folder; a missing one is fine, any other failure is an OSError."""
        if self.local:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- reading ----------------------------------------------------------------------------------------
    def listing(self, folder: str) -> list[tuple[str, int, Any]]:
        """(name, size, mtime) of the plain files in `folder` that are not temporaries; [] if it is missing."""
        try:
            if not self.local:
                self.fs.invalidate_cache(folder)  # a remote listing is cached by fsspec; polls need it fresh
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
        """current_state.json if it holds a valid round (an int >= 0), else None."""
        state = self.read_json(self.state_path())
        if state is None or not isinstance(state.get("round"), int) or state["round"] < 0:
            return None
        return state

    def write_clock(self, state: dict) -> None:
        self.write_atomic(self.state_path(), json.dumps(state, indent=1).encode())

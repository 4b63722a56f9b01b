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

from p2pswarm import validate as V

log = logging.getLogger(__name__)

_counter = itertools.count()
_ROUND_RE = re.compile(r"^round_(\d+)$")


MAX_JSON_BYTES = 1 << 20  # registrations are ~600 bytes, manifests a few KB, the clock ~300 bytes


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(data: bytes | str) -> dict | None:
    """A JSON object, or None for anything else (never raises): not JSON, not an object, NaN or Infinity
    anywhere in it, an integer of more than 4300 digits, nesting deeper than the parser's recursion."""
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except Exception:  # noqa: BLE001 - ValueError, UnicodeDecodeError, RecursionError...
        return None
    return obj if isinstance(obj, dict) else None


def parse_clock(state: Any, now: float | None = None) -> dict | None:
    """The round clock of current_state.json: {round, stage, started, updated, coordinator,
    coordinator_name}, or None when it has no round in [0, 2**31). The other fields are the fork's and
    optional: one that is missing or out of range reads as None (stage as 0), so that a clock written by
    the fork's coordinator still reads. Never raises."""
    try:
        if not isinstance(state, dict):
            return None
        rnd = V.field(state, "round", V.integer, 0)
    except Exception:  # noqa: BLE001
        return None

    def optional(key: str, check, *args: Any, default: Any = None) -> Any:
        try:
            return V.field(state, key, check, *args, default=default)
        except Exception:  # noqa: BLE001 - an optional field the fork may write otherwise
            return default

    return {"round": rnd, "stage": optional("stage", V.integer, 0, default=0),
            "started": optional("started", V.timestamp, now), "updated": optional("updated", V.timestamp, now),
            "coordinator": optional("coordinator", V.peer_id),
            "coordinator_name": optional("coordinator_name", V.name)}


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

    def read(self, path: str, max_bytes: int | None = None) -> bytes | None:
        """The file's bytes; None if it is missing, unreadable, or (with `max_bytes`) larger than that."""
        try:
            if max_bytes is None:
                return self.fs.cat_file(path)
            data = self.fs.cat_file(path, start=0, end=max_bytes + 1)
            return data if len(data) <= max_bytes else None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            log.debug("reading %s failed: %s", path, e)
            return None

    def read_json(self, path: str, max_bytes: int = MAX_JSON_BYTES) -> dict | None:
        """A JSON object from the folder, or None (never raises): missing, over `max_bytes`, not JSON, nested
        too deep for the parser, or holding NaN / Infinity (which Python's json would otherwise accept)."""
        data = self.read(path, max_bytes)
        return None if data is None else parse_json(data)

    # ---- the round clock --------------------------------------------------------------------------------
    def read_clock(self) -> dict | None:
        """current_state.json as `parse_clock` reads it, or None when it holds no valid round."""
        return parse_clock(self.read_json(self.state_path()))

    def write_clock(self, state: dict) -> None:
        self.write_atomic(self.state_path(), json.dumps(state, indent=1).encode())

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
from p2pswarm.errors import UserError

log = logging.getLogger(__name__)

_counter = itertools.count()
# ASCII digits only, at most 10 of them, the whole name (fullmatch: `$` would also take a trailing newline; `\d`
# Unicode digits such as `round_٥`); the round itself in [0, 2**31) like every round on the wire.
_ROUND_RE = re.compile(r"round_([0-9]{1,10})")
_STAGE_RE = re.compile(r"stage_([0-9]{1,10})")
# A rollout file: ours (`<node>.msgpack`, a bridge's `<node>~<peer id>.msgpack`: safe_name's characters) or
# the fork's (`<NODE_ID>.json`). The janitor retires these and nothing else.
_ROLLOUT_FILE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._~-]*\.(msgpack|json)")


MAX_JSON_BYTES = 1 << 20  # registrations are ~600 bytes, manifests a few KB, the clock ~300 bytes


def parse_json(data: bytes | str) -> dict | None:
    """A JSON object, or None for anything else (never raises): not JSON, not an object, NaN or Infinity
    anywhere in it, an integer of more than 4300 digits, nesting deeper than validate.JSON_MAX_DEPTH."""
    try:
        obj = V.json_value(data)
    except Exception:  # noqa: BLE001 - Invalid, UnicodeDecodeError...
        return None
    return obj if isinstance(obj, dict) else None


def parse_clock(state: Any, now: float | None = None) -> dict | None:
    """The round clock of current_state.json: {round, stage, started, updated, coordinator,
    coordinator_name}, or None when it has no round in [0, 2**31). The other fields are optional: one that
    is missing or out of range reads as None (stage as 0). A file the fork's coordinator wrote has
    `updated_at` and `updated_by` instead of ours: they stand in for `updated` / `started` and
    `coordinator_name`, so that its clock paces our nodes and shows in `p2pswarm status`. Never raises.
    Nothing in the file is authenticated (the fork's format has no signature): a round in range is only a
    claim, which FolderCoordinator adopts only as far as the live nodes' signed registrations support it."""
    try:
        if not isinstance(state, dict):
            return None
        rnd = V.field(state, "round", V.integer, 0)
    except Exception:  # noqa: BLE001
        return None

    def optional(key: str, check, *args: Any, default: Any = None) -> Any:
        try:
            return V.field(state, key, check, *args, default=default)
        except Exception:  # noqa: BLE001 - an optional field another writer may write otherwise
            return default

    fork_updated = optional("updated_at", V.timestamp, now)
    return {"round": rnd, "stage": optional("stage", V.integer, 0, default=0),
            "started": optional("started", V.timestamp, now, default=fork_updated),
            "updated": optional("updated", V.timestamp, now, default=fork_updated),
            "coordinator": optional("coordinator", V.peer_id),
            "coordinator_name": optional("coordinator_name", V.name, default=optional("updated_by", V.name))}


# What the fork's coordinator writes in current_state.json besides the round, and nothing of ours reads:
# kept as they were when our coordinator rewrites the file (its `list_experiments` shows `created_at`).
_FORK_CLOCK_FIELDS = {"created_at": (V.timestamp,), "experiment_name": (V.text, 256),
                      "config_overrides": (V.plain,)}
MAX_KEPT_BYTES = 64 << 10


def kept_clock_fields(state: Any) -> dict:
    """The fork's fields of a current_state.json (parsed JSON, untrusted) that a rewrite keeps: each one
    checked, a bad or oversized one dropped. Never raises."""
    if not isinstance(state, dict):
        return {}
    out = {}
    for key, (check, *args) in _FORK_CLOCK_FIELDS.items():
        try:
            value = V.field(state, key, check, *args)
            if key == "config_overrides":
                V.mapping(value, key)
                if len(json.dumps(value)) > MAX_KEPT_BYTES:
                    continue
            out[key] = value
        except Exception:  # noqa: BLE001 - missing or not what the fork writes: not kept
            continue
    return out


def clock_record(round: int, *, now: float, coordinator: str, coordinator_name: str, kept: dict) -> dict:
    """current_state.json as our coordinator writes it: ours (`started`, `updated`, `coordinator`,
    `coordinator_name`) and what the fork's readers need (`round`, `stage`, `updated_at`, `updated_by`,
    `created_at`: its workers follow this clock, its `get_experiment_status` shows it), over the `kept`
    fork fields of the file this replaces."""
    return {**kept, "round": round, "stage": 0, "started": now, "updated": now, "updated_at": now,
            "updated_by": coordinator_name, "created_at": kept.get("created_at", now),
            "coordinator": coordinator, "coordinator_name": coordinator_name}


def safe_name(name: str) -> str:
    """A node name as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return out or "node"


def round_of(folder: str) -> int | None:
    """The round a `round_R` (rollouts) or `round_NNNNNN` (checkpoints) folder name stands for, else None."""
    m = _ROUND_RE.fullmatch(folder)
    return int(m.group(1)) if m and int(m.group(1)) < 2**31 else None


def stage_of(folder: str) -> int | None:
    """The stage a `stage_S` folder name stands for, else None."""
    m = _STAGE_RE.fullmatch(folder)
    return int(m.group(1)) if m and int(m.group(1)) < 2**31 else None


def is_rollout_file(name: str) -> bool:
    """Whether a file name in a stage folder is a rollout file of ours or of the fork's."""
    return bool(_ROLLOUT_FILE_RE.fullmatch(name))


class FolderMissing(UserError, FileNotFoundError):
    """The shared folder is not there, for a node that may not create it; the message names it."""


class NameTaken(UserError, FileExistsError):
    """A node name whose files in the folder another node wrote; the message names it and the way out."""


class FolderStore:
    """One experiment's folder (`<root>/experiments/<name>`): its paths, atomic writes, listings with
    size and modification time, bounded reads, and the round clock as last written.

    A local path goes through os directly (fsync, os.replace: atomic on POSIX and on a Drive mount); any
    other fsspec URL through the file system's own put and move.
    """

    def __init__(self, url: str, experiment: str):
        self.url, self.experiment = str(url), experiment
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"
        self.base = f"{self.root}/experiments/{experiment}"

    def open_folder(self, *, coordinator: bool) -> None:
        """Check, before a node writes anything, that the shared folder (the root) is there.

        A worker never creates it: a typo in GDRIVE_PATH, or a Drive that is not mounted, would otherwise
        start an experiment of one in a new local folder without a word; FolderMissing names it. A
        coordinator (it starts experiments) creates it and says so. A worker whose experiment is not there
        yet goes on (it may have started before its coordinator) but says which experiments are."""
        try:
            found = self.fs.isdir(self.root)
            exists = found or self.fs.exists(self.root)
        except OSError as e:
            raise FolderMissing(f"the shared folder {self.url} cannot be read: {e}") from None
        if exists and not found:
            raise FolderMissing(f"the shared folder {self.url} is a file, not a folder (drive_path / GDRIVE_PATH)")
        if not found:
            if not coordinator:
                raise FolderMissing(f"the shared folder {self.url} does not exist (or is not mounted): check "
                                    "drive_path / GDRIVE_PATH; only a coordinator (NODE_ROLE=coordinator) creates one")
            self.fs.makedirs(self.root, exist_ok=True)
            log.info("created the shared folder %s (it did not exist) for experiment %s", self.url, self.experiment)
            return
        if not coordinator and not self.fs.isdir(self.base):
            names = sorted(n for n in self.subfolders(f"{self.root}/experiments") if not n.startswith("."))
            log.warning("experiment %s is not in %s yet (experiments there: %s): waiting for its coordinator",
                        self.experiment, self.url, ", ".join(names) or "none")

    def claim_name(self, name: str, peer_id: str) -> None:
        """Check, before a node writes anything, that the files its name stands for are its own or free.

        Its registration (peers/<node>.json) is rewritten every heartbeat and its logs (logs/<node>/) on
        every mirror: under a name another node registered or logged with (a fork node `node_1` in the
        same experiment, or another p2pswarm node) they would overwrite that node's files. So the name is
        this node's only when its registration there is signed by this node's key, or when neither exists.
        NameTaken names it otherwise."""
        from p2pswarm.comm.drive.records import parse_registration  # records builds on this module

        node = safe_name(name)
        path = self.peer_path(node)
        data = self.read(path, MAX_JSON_BYTES)
        if data is not None:
            reg = parse_registration(node, parse_json(data))
            if reg is not None and reg.peer_id == peer_id:
                return
            whose = "an unsigned registration (the fork's?)" if reg is None else f"the registration of {reg.peer_id}"
        elif self.fs.exists(path):
            whose = "a registration this node cannot read"
        elif self.fs.isdir(self.path("logs", node)):
            whose = "no registration but logs/" + node
        else:
            return
        raise NameTaken(f"node name {name!r} is taken in experiment {self.experiment} ({self.url}): {path} holds "
                        f"{whose}, not this node's; its files are not this node's to overwrite: choose another "
                        "NODE_ID (or use the identity file that registered it)")

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
        """Rename a file or a whole folder to `dest` (its parent is created); OSError if that fails, and
        FileExistsError if `dest` exists: a move never replaces anything."""
        parent = dest.rsplit("/", 1)[0]
        if self.local:
            if os.path.lexists(dest):
                raise FileExistsError(f"{dest} exists")
            os.makedirs(parent, exist_ok=True)
            os.rename(src, dest)
        else:
            if self.fs.exists(dest):
                raise FileExistsError(f"{dest} exists")
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.mv(src, dest, recursive=True)

    def remove_empty_folder(self, path: str) -> bool:
        """Remove `path` if it is an empty folder; False (and nothing removed) otherwise."""
        try:
            if self.local:
                os.rmdir(path)
            else:
                if self.fs.ls(path, detail=False):
                    return False
                self.fs.rmdir(path)
            return True
        except OSError:
            return False

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

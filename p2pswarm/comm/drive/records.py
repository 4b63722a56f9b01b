"""Signed JSON records in the folder: registrations (with heartbeats) and checkpoint manifests.

A record is a JSON object with the signer's peer id, its public key and an Ed25519 signature over the
canonical JSON of every other field, so nobody who can write to the folder can speak for another node.
`check_record` is the only gate: a record it refuses is never looked at further; `parse_registration`
and `parse_manifest` then check every field (p2pswarm/validate.py) and never raise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from p2pswarm import validate as V
from p2pswarm.comm.core import Progress
from p2pswarm.comm.drive.fork import FORK_PEER_TIMEOUT
from p2pswarm.comm.drive.store import safe_name
from p2pswarm.identity import Identity, peer_id_from_public, verify

MAX_BRIDGED = 1024  # a registration cannot make every collect wait for more relayed peers than this


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def signed_record(identity: Identity, fields: dict) -> bytes:
    body = {**fields, "peer_id": identity.peer_id, "key": identity.public.hex()}
    return json.dumps({**body, "sig": identity.sign(_canonical(body)).hex()}, indent=1).encode()


def check_record(obj: Any, now: float | None = None) -> dict | None:
    """The record if it is signed by the peer it names and its `time` is a plausible wall-clock time (finite,
    after 2020, at most 10 minutes ahead of ours: JSON allows NaN and Infinity, and a registration with
    time=Infinity would stay live for ever), else None. Never raises."""
    try:
        V.mapping(obj, "record")
        body = {k: v for k, v in obj.items() if k != "sig"}
        key, sig = V.hex_bytes(obj.get("key"), "key", 32), V.hex_bytes(obj.get("sig"), "sig", 64)
        if peer_id_from_public(key) != V.field(obj, "peer_id", V.peer_id) or not verify(key, sig, _canonical(body)):
            return None
        V.field(obj, "time", V.timestamp, now)
    except Exception:  # noqa: BLE001 - anything in a shared folder may be anything
        return None
    return obj


# ---- registrations: peers/<node>.json ---------------------------------------------------------------------
@dataclass
class Registration:
    """A node's signed registration, refreshed by its heartbeat."""

    node: str  # the file stem in peers/ and rollouts/
    peer_id: str
    name: str
    role: str
    round: int  # the round it last published
    stage: int
    time: float  # of the last heartbeat
    left: bool
    finished: int = -1  # the last round the node trained (the clock waits for this, not for publishing)
    bridged: int = 0  # peers on the other side of a bridge (comm=hybrid) whose batches this node relays
    ignoring: tuple[str, ...] = ()  # peer ids this node bans for now (sent it invalid data): `p2pswarm status`
    fork: bool = False  # an unsigned node of the rl-swarm fork (comm/drive/fork.py), seen from its files

    @property
    def progress(self) -> Progress:
        return Progress(self.round, self.finished)

    def is_live(self, now: float, peer_timeout: float) -> bool:
        if self.fork:  # no heartbeat: `time` is its last file's, and a round of a real model takes minutes
            peer_timeout = max(peer_timeout, FORK_PEER_TIMEOUT)
        return not self.left and now - self.time <= peer_timeout


def registration_record(identity: Identity, reg: Registration) -> bytes:
    """The signed bytes of peers/<node>.json (the fork's fields first: name, node, role, round, stage, time)."""
    return signed_record(identity, {"name": reg.name, "node": reg.node, "role": reg.role, "round": reg.round,
                                    "stage": reg.stage, "time": reg.time, "left": reg.left,
                                    "finished": reg.finished, "bridged": reg.bridged,
                                    **({"ignoring": list(reg.ignoring)} if reg.ignoring else {})})


ROLES = ("worker", "coordinator")


def parse_registration(node: str, obj: Any, now: float | None = None) -> Registration | None:
    """The registration in peers/<node>.json if it is signed, names the node its file is named after, and
    every field is in range (validate.py: name printable, role worker|coordinator, rounds in [-1, 2**31),
    left a bool, bridged in [0, 2**31) and counted at most MAX_BRIDGED); else None. Never raises.
    Registrations lacking our optional fields (finished, bridged, left) read with defaults; the fork's own,
    unsigned registrations are not read here (comm/drive/fork.py)."""
    rec = check_record(obj, now)
    if rec is None:
        return None
    try:
        if safe_name(V.field(rec, "node", V.name, default=node)) != node:
            return None
        return Registration(node, rec["peer_id"], V.field(rec, "name", V.name, default=node),
                            V.field(rec, "role", V.choice, ROLES, default="worker"),
                            V.field(rec, "round", V.integer, default=-1), V.field(rec, "stage", V.integer, 0, default=0),
                            V.timestamp(rec["time"], "time", now), V.field(rec, "left", V.flag, default=False),
                            V.field(rec, "finished", V.integer, default=-1),
                            min(V.field(rec, "bridged", V.integer, 0, default=0), MAX_BRIDGED),
                            _ignoring(rec.get("ignoring", [])))
    except Exception:  # noqa: BLE001
        return None


MAX_IGNORING = 64


def _ignoring(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_IGNORING:
        raise V.Invalid("ignoring", "not a list of at most 64 peer ids")
    return tuple(V.peer_id(p, "ignoring") for p in v)


# ---- checkpoint manifests: checkpoints/<node>/round_NNNNNN/manifest.json ---------------------------------------
MAX_FILES = 10_000
MAX_FILE_BYTES = 2**40


@dataclass
class Manifest:
    """A signed list of a checkpoint's files: relative path -> (size, sha256 hex)."""

    peer_id: str
    node: str
    round: int
    files: dict[str, tuple[int, str]]


def manifest_record(identity: Identity, node: str, round: int, files: dict[str, dict]) -> bytes:
    return signed_record(identity, {"node": node, "round": round, "time": time.time(), "files": files})


def parse_manifest(obj: Any, now: float | None = None) -> Manifest | None:
    """The manifest if it is signed and every entry is a safe relative path (no `..`, not absolute, printable,
    at most 255 characters) with a size in [0, 2**40) and a sha256 of 64 lowercase hex digits; else None.
    Never raises."""
    rec = check_record(obj, now)
    if rec is None:
        return None
    try:
        files_raw = V.field(rec, "files", V.mapping)
        if not 1 <= len(files_raw) <= MAX_FILES:
            return None
        files = {}
        for rel, meta in files_raw.items():
            parts = PurePosixPath(V.name(rel, "file", 255)).parts
            if not parts or rel.startswith("/") or ".." in parts or "\\" in rel:
                return None
            V.mapping(meta, "file")
            files[rel] = (V.field(meta, "size", V.integer, 0, MAX_FILE_BYTES),
                          V.field(meta, "sha256", V.hex_bytes, 32).hex())
        return Manifest(rec["peer_id"], V.field(rec, "node", V.name), V.field(rec, "round", V.integer, 0), files)
    except Exception:  # noqa: BLE001
        return None

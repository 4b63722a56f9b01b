"""Signed JSON records in the folder: registrations (with heartbeats) and checkpoint manifests.

A record is a JSON object with the signer's peer id, its public key and an Ed25519 signature over the
canonical JSON of every other field, so nobody who can write to the folder can speak for another node.
`check_record` is the only gate: a record it refuses is never looked at further.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from p2pswarm.comm.core import Progress
from p2pswarm.comm.drive.store import safe_name
from p2pswarm.identity import Identity, peer_id_from_public, verify

MAX_BRIDGED = 1024  # a registration cannot make every collect wait for more relayed peers than this


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def signed_record(identity: Identity, fields: dict) -> bytes:
    body = {**fields, "peer_id": identity.peer_id, "key": identity.public.hex()}
    return json.dumps({**body, "sig": identity.sign(_canonical(body)).hex()}, indent=1).encode()


def check_record(obj: dict | None) -> dict | None:
    """The record if its signature and peer id hold and it has a numeric `time`, else None."""
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

    @property
    def progress(self) -> Progress:
        return Progress(self.round, self.finished)

    def is_live(self, now: float, peer_timeout: float) -> bool:
        return not self.left and now - self.time <= peer_timeout


def registration_record(identity: Identity, reg: Registration) -> bytes:
    """The signed bytes of peers/<node>.json (the fork's fields first: name, node, role, round, stage, time)."""
    return signed_record(identity, {"name": reg.name, "node": reg.node, "role": reg.role, "round": reg.round,
                                    "stage": reg.stage, "time": reg.time, "left": reg.left,
                                    "finished": reg.finished, "bridged": reg.bridged})


def parse_registration(node: str, obj: dict | None) -> Registration | None:
    """The registration in peers/<node>.json if it is signed, names the node its file is named after, and its
    fields have the right types; else None."""
    rec = check_record(obj)
    if rec is None or safe_name(str(rec.get("node", node))) != node:
        return None
    try:
        return Registration(node, rec["peer_id"], str(rec.get("name", node)), str(rec.get("role", "")),
                            int(rec.get("round", -1)), int(rec.get("stage", 0)), float(rec["time"]),
                            bool(rec.get("left", False)), int(rec.get("finished", -1)),
                            min(max(int(rec.get("bridged", 0)), 0), MAX_BRIDGED))
    except (TypeError, ValueError):
        return None

"""The rl-swarm Google-Drive fork's files that a mixed experiment exchanges (fork nodes and ours in one
folder): its registrations, its rollouts and its reward submissions. Parsers and a writer only; FolderComm
decides what to do with them (only with `drive_trust_folder` on: nothing here is signed).

    peers/<node>.json                          {"peer_id": <node>, "registered_at": t, "node_role": role}
                                               written once, when the node starts (the fork has no heartbeat)
    rollouts/round_R/stage_S/<node>.json       {"peer_id": <node>, "round": R, "stage": S, "timestamp": t,
                                                "rollouts": {"<batch id>": [payload, ...], ...}}
        payload: {"world_state": {"environment_states": {"question", "answer", "metadata"}, ...},
                  "actions": [completion, ...], "metadata": ...}
        batch id: the md5 of the question as a decimal integer (the fork's readers skip a payload whose
                  question does not hash to its batch id)
    rewards/round_R/stage_0/<node>.json        {"round": R, "stage": 0, "reward": x, "peer_id": <node>,
                                                "submitted_at": t}: written once the node has collected
                                                round R, right before it trains on it

A fork node is known by its name only; here it gets the pseudo peer id `fork:<node>` (never a real peer id,
which is always `12D3KooW...`), under which its groups, drops and bans are counted like anyone's.
Every parser checks every field it uses (p2pswarm/validate.py) and raises only `V.Invalid`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from p2pswarm import validate as V
from p2pswarm import wire
from p2pswarm.comm.drive.store import safe_name
from p2pswarm.types import Group, Task

PREFIX = "fork:"
# The fork has no heartbeat: a fork node writes its registration once, then a rollout file per stage and a
# reward submission per round. It counts as live this long after the last of those (or drive_peer_timeout,
# if longer), so that the minutes-long rounds of a real model do not make it flap.
FORK_PEER_TIMEOUT = 600.0
ROLES = ("worker", "coordinator")
_MAX_BATCH_ID_DIGITS = 40  # an md5 as a decimal integer has at most 39 digits


def fork_peer_id(node: str) -> str:
    """The pseudo peer id a fork node's groups and counters go under."""
    return PREFIX + node


def is_fork_peer(peer: str) -> bool:
    return peer.startswith(PREFIX)


def batch_id(question: str) -> int:
    """The fork's key for a task: the md5 of its question, as an integer (genrl's generate_md5_hash_id)."""
    return int(hashlib.md5(question.encode()).hexdigest(), 16)


# ---- peers/<node>.json -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForkPeer:
    node: str
    role: str
    registered_at: float


def looks_like_fork_peer(obj: Any) -> bool:
    """True for an unsigned registration of the fork's shape (so that it is counted as the fork's, not as a
    broken registration of ours), valid or not."""
    return isinstance(obj, dict) and "sig" not in obj and "registered_at" in obj


def parse_fork_peer(node: str, obj: Any, now: float | None = None) -> ForkPeer:
    """The fork registration in peers/<node>.json: its `peer_id` is the node's name and must be the file's
    name; `registered_at` a plausible wall-clock time; `node_role` worker (default) or coordinator."""
    V.mapping(obj, "registration")
    name = V.field(obj, "peer_id", V.name)
    if safe_name(name) != node:
        raise V.Invalid("peer_id", "is not the file's name")
    return ForkPeer(node, V.field(obj, "node_role", V.choice, ROLES, default="worker"),
                    V.field(obj, "registered_at", V.timestamp, now))


# ---- rewards/round_R/stage_0/<node>.json ------------------------------------------------------------------------
def parse_fork_submission(node: str, round: int, obj: Any, now: float | None = None) -> float:
    """When the fork node submitted round `round` (its reward file in that round's folder): the round it
    names must be that round, its peer_id the file's name. The reward itself is not used."""
    V.mapping(obj, "submission")
    if V.field(obj, "round", V.integer, 0) != round:
        raise V.Invalid("round", "is not its folder's round")
    if safe_name(V.field(obj, "peer_id", V.name)) != node:
        raise V.Invalid("peer_id", "is not the file's name")
    return V.field(obj, "submitted_at", V.timestamp, now)


# ---- rollouts/round_R/stage_S/<node>.json -----------------------------------------------------------------------
@dataclass
class ForkBatch:
    node: str
    round: int
    stage: int
    time: float
    groups: list[Group]


def parse_fork_rollouts(node: str, round: int, stage: int, obj: Any, limits: wire.Limits = wire.Limits(),
                        now: float | None = None) -> ForkBatch:
    """A fork rollout file for (round, stage) of `node`, as groups of the pseudo peer `fork:<node>`.

    Checked like a batch on the wire: peer_id, round and stage those of the file's place; at most
    `limits.max_groups` payloads, each with 1..max_completions completions of at most max_text characters,
    a question and an answer of at most max_text, metadata plain data of at most max_meta_bytes (as JSON).
    The task's dataset is its metadata's `source_dataset` (what the fork's scorer uses too); the payload's
    answer is the one the receiver scores against: the fork sends no recipe to re-derive it from."""
    V.mapping(obj, "rollout file")
    if safe_name(V.field(obj, "peer_id", V.name)) != node:
        raise V.Invalid("peer_id", "is not the file's name", "wrong_peer")
    if V.field(obj, "round", V.integer, 0) != round or V.field(obj, "stage", V.integer, 0) != stage:
        raise V.Invalid("round", "is not its folder's round and stage", "wrong_slot")
    created = V.field(obj, "timestamp", V.timestamp, now)
    batches = V.field(obj, "rollouts", V.mapping)
    peer = fork_peer_id(node)
    groups: list[Group] = []
    for key, payloads in batches.items():
        V.text(key, "batch id", _MAX_BATCH_ID_DIGITS, min_len=1)
        if not key.isdigit():
            raise V.Invalid("batch id", "not a decimal integer")
        if type(payloads) is not list:
            raise V.Invalid("rollouts", "a batch is not a list")
        for p in payloads:
            if len(groups) >= limits.max_groups:
                raise V.Invalid("rollouts", f"more than {limits.max_groups} payloads", "too_large")
            groups.append(_group(p, f"{peer}:{round}:{stage}:{key}:{len(groups)}", peer, stage, limits))
    return ForkBatch(node, round, stage, created, groups)


def _group(p: Any, task_id: str, peer: str, stage: int, limits: wire.Limits) -> Group:
    V.mapping(p, "payload")
    env = V.field(V.field(p, "world_state", V.mapping), "environment_states", V.mapping)
    actions = V.field(p, "actions", _list, limits.max_completions)
    completions = [V.text(a, "action", limits.max_text) for a in actions]
    meta = V.plain(V.field(env, "metadata", V.mapping, default={}), "metadata")
    if len(json.dumps(meta)) > limits.max_meta_bytes:
        raise V.Invalid("metadata", f"over {limits.max_meta_bytes} bytes", "too_large")
    dataset = meta.get("source_dataset", "")
    dataset = V.name(dataset, "source_dataset", limits.max_id) if dataset else ""
    task = Task(task_id=task_id, dataset=dataset, question=V.field(env, "question", V.text, limits.max_text),
                answer=V.field(env, "answer", V.text, limits.max_text), metadata=meta, stage=stage)
    return Group(task=task, completions=completions, peer=peer)


def _list(v: Any, field: str, max_len: int) -> list:
    if type(v) is not list or not 1 <= len(v) <= max_len:
        raise V.Invalid(field, f"not a list of 1..{max_len}", "too_large" if type(v) is list and v else "malformed")
    return v


def fork_rollouts_record(node: str, round: int, stage: int, groups: list[Group]) -> bytes:
    """This node's groups as a fork rollout file (what the fork's workers fetch and transplant): one payload
    per group under its question's batch id, the task's metadata as is (the fork's scorer reads its
    `source_dataset`, as ours does)."""
    rollouts: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        t = g.task
        rollouts.setdefault(str(batch_id(t.question)), []).append({
            "world_state": {"environment_states": {"question": t.question, "answer": t.answer, "metadata": t.metadata},
                            "opponent_states": None, "personal_states": None},
            "actions": list(g.completions),
            "metadata": None,
        })
    return json.dumps({"peer_id": node, "round": round, "stage": stage, "timestamp": time.time(),
                       "rollouts": rollouts}, indent=1).encode()

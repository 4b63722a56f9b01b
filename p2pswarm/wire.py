"""The one wire format for rollouts, used by every transport (in-process, hivemind, folder, torch.distributed).

    envelope = msgpack {"v": 1, "body": bytes, "key": bytes(32), "sig": bytes(64)}
    body     = msgpack {"swarm", "round", "stage", "peer", "created", "groups": [group, ...]}
    group    = {"id", "dataset", "question", "answer", "meta", "completions": [str], "rewards": [float],
                "recipe"?: {"dataset", "config", "seed", "index", "size"}}

The sender's answer, meta and rewards are advisory: a receiver regenerates each task from its recipe
(DataManager.rederive) and scores against its own copy; a group without a recipe it knows is dropped.

`sig` is the sender's Ed25519 signature over `body`; `key` is its public key, and `peer` must be the
peer id derived from `key`. A transport that knows which peer it talked to also checks that it is
`peer`. decode() raises WireError with a short reason; transports count reasons and drop the message.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pswarm.identity import Identity, peer_id_from_public, verify
from p2pswarm.types import Group, Task

VERSION = 1


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 * 1024 * 1024
    max_groups: int = 256
    max_completions: int = 64
    max_text: int = 32 * 1024  # characters per question / answer / completion
    max_meta_bytes: int = 16 * 1024
    round_window: int = 2  # accept rounds in [current - window, current + window]


class WireError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RolloutBatch:
    swarm: str
    round: int
    stage: int
    peer: str
    groups: list[Group]
    created: float = field(default_factory=time.time)


def _group_to_wire(g: Group) -> dict[str, Any]:
    t = g.task
    return {
        "id": t.task_id,
        "dataset": t.dataset,
        "question": t.question,
        "answer": t.answer,
        "meta": t.metadata,
        "completions": list(g.completions),
        "rewards": [float(r) for r in g.rewards],
        **({"recipe": t.recipe} if t.recipe is not None else {}),
    }


def encode(batch: RolloutBatch, identity: Identity) -> bytes:
    if batch.peer != identity.peer_id:
        raise ValueError("a batch must be signed by the peer it names")
    body = msgpack.packb(
        {
            "swarm": batch.swarm,
            "round": batch.round,
            "stage": batch.stage,
            "peer": batch.peer,
            "created": batch.created,
            "groups": [_group_to_wire(g) for g in batch.groups],
        },
        use_bin_type=True,
    )
    return msgpack.packb({"v": VERSION, "body": body, "key": identity.public, "sig": identity.sign(body)})


def _str(d: dict, key: str, limits: Limits) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise WireError("schema", f"{key} must be a string")
    if len(v) > limits.max_text:
        raise WireError("too_large", f"{key} is {len(v)} characters")
    return v


def _int(d: dict, key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise WireError("schema", f"{key} must be a non-negative integer")
    return v


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise WireError("malformed", f"{what}: {type(e).__name__}") from None


def decode(
    data: bytes,
    *,
    swarm: str,
    current_round: int | None = None,
    expect_peer: str | None = None,
    limits: Limits = Limits(),
) -> RolloutBatch:
    """Parse and check a batch: size, envelope, version, signature, peer id, swarm, round window, schema."""
    if not isinstance(data, (bytes, bytearray)):
        raise WireError("malformed", "not bytes")
    if len(data) > limits.max_bytes:
        raise WireError("too_large", f"{len(data)} bytes")
    env = _unpack(data, "envelope")
    if not isinstance(env, dict):
        raise WireError("malformed", "envelope is not a map")
    if env.get("v") != VERSION:
        raise WireError("bad_version", repr(env.get("v"))[:20])
    body, key, sig = env.get("body"), env.get("key"), env.get("sig")
    if not (isinstance(body, bytes) and isinstance(key, bytes) and isinstance(sig, bytes)) or len(key) != 32:
        raise WireError("malformed", "envelope fields")
    if not verify(key, sig, body):
        raise WireError("bad_signature")
    b = _unpack(body, "body")
    if not isinstance(b, dict):
        raise WireError("schema", "body is not a map")
    peer = _str(b, "peer", limits)
    if peer != peer_id_from_public(key):
        raise WireError("wrong_peer", "signing key does not belong to the named peer")
    if expect_peer is not None and peer != expect_peer:
        raise WireError("wrong_peer", "sender is not the peer the transport saw")
    if b.get("swarm") != swarm:
        raise WireError("wrong_swarm", repr(b.get("swarm"))[:40])
    rnd, stage = _int(b, "round"), _int(b, "stage")
    if current_round is not None and abs(rnd - current_round) > limits.round_window:
        raise WireError("round_window", f"round {rnd}, current {current_round}")
    created = b.get("created")
    if not isinstance(created, (int, float)) or not math.isfinite(created):
        raise WireError("schema", "created")
    groups_raw = b.get("groups")
    if not isinstance(groups_raw, list):
        raise WireError("schema", "groups must be a list")
    if len(groups_raw) > limits.max_groups:
        raise WireError("too_large", f"{len(groups_raw)} groups")
    groups = []
    for raw in groups_raw:
        if not isinstance(raw, dict):
            raise WireError("schema", "group is not a map")
        completions = raw.get("completions")
        if not isinstance(completions, list) or not 1 <= len(completions) <= limits.max_completions:
            raise WireError("schema", "completions")
        for c in completions:
            if not isinstance(c, str):
                raise WireError("schema", "completion is not a string")
            if len(c) > limits.max_text:
                raise WireError("too_large", "completion")
        rewards = raw.get("rewards", [])
        if not isinstance(rewards, list) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards
        ):
            raise WireError("schema", "rewards")
        meta = raw.get("meta", {})
        if not isinstance(meta, dict):
            raise WireError("schema", "meta")
        if len(msgpack.packb(meta)) > limits.max_meta_bytes:
            raise WireError("too_large", "meta")
        recipe = raw.get("recipe")
        if recipe is not None:
            if not isinstance(recipe, dict):
                raise WireError("schema", "recipe")
            if len(msgpack.packb(recipe)) > limits.max_meta_bytes:
                raise WireError("too_large", "recipe")
        task = Task(
            task_id=_str(raw, "id", limits),
            dataset=_str(raw, "dataset", limits),
            question=_str(raw, "question", limits),
            answer=_str(raw, "answer", limits),
            metadata=meta,
            stage=stage,
            recipe=recipe,
        )
        groups.append(Group(task=task, completions=completions, peer=peer, sender_rewards=[float(r) for r in rewards]))
    return RolloutBatch(swarm=b["swarm"], round=rnd, stage=stage, peer=peer, groups=groups, created=float(created))


class Inbox:
    """Receiver-side bookkeeping shared by transports: decode, drop replays, count drops by reason."""

    def __init__(self, swarm: str, limits: Limits = Limits()):
        self.swarm = swarm
        self.limits = limits
        self.drops: Counter[str] = Counter()
        self.received = 0
        self.bytes_received = 0
        self.groups_from: Counter[str] = Counter()  # groups accepted, by sending peer
        self._seen: set[tuple[str, int, int]] = set()

    def accept(
        self,
        data: bytes,
        *,
        current_round: int | None = None,
        expect_peer: str | None = None,
        slot: tuple[int, int] | None = None,
    ) -> RolloutBatch | None:
        """The decoded batch, or None (counted) when it is invalid, not for the (round, stage) `slot` the
        caller is collecting, or a replay of one already taken."""
        try:
            batch = decode(data, swarm=self.swarm, current_round=current_round, expect_peer=expect_peer, limits=self.limits)
        except WireError as e:
            self.drops[e.reason] += 1
            return None
        if slot is not None and (batch.round, batch.stage) != slot:
            self.drops["wrong_slot"] += 1
            return None
        key = (batch.peer, batch.round, batch.stage)
        if key in self._seen:
            self.drops["replay"] += 1
            return None
        self._seen.add(key)
        self.received += 1
        self.bytes_received += len(data)
        self.groups_from[batch.peer] += len(batch.groups)
        return batch

    def forget_before(self, round: int) -> None:
        self._seen = {k for k in self._seen if k[1] >= round}

    def counters(self) -> dict[str, int]:
        out = {"batches_received": self.received, "bytes_received": self.bytes_received}
        out.update({f"dropped_{k}": v for k, v in self.drops.items()})
        return out

"""The one wire format for rollouts, used by every transport (in-process, hivemind, folder, torch.distributed).

    envelope = msgpack {"v": 1, "body": bytes, "key": bytes(32), "sig": bytes(64)}
    body     = msgpack {"swarm", "round", "stage", "peer", "created", "groups": [group, ...]}
    group    = {"id", "dataset", "question", "answer", "meta", "completions": [str], "rewards": [float],
                "recipe"?: {"dataset", "config", "seed", "index", "size"}}

The sender's answer, meta and rewards are advisory: a receiver regenerates each task from its recipe
(DataManager.rederive) and scores against its own copy; a group without a recipe it knows is dropped.

`sig` is the sender's Ed25519 signature over `body`; `key` is its public key, and `peer` must be the
peer id derived from `key`. A transport that knows which peer it talked to also checks that it is
`peer`. decode() raises WireError with a short reason, and nothing else whatever the bytes; transports
count reasons and drop the message.

Every field is checked with p2pswarm/validate.py before it is used: round and stage ints in [0, 2**31),
created a finite wall-clock time no later than 10 minutes ahead of ours, the peer a real Ed25519 peer id,
task id a printable name of at most 256 characters, rewards finite within +-1e6, meta and recipe plain
data (string keys, finite numbers, at most 8 deep), every text within `max_text`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pswarm import validate as V
from p2pswarm.bounded import RecentCounter
from p2pswarm.identity import Identity, peer_id_from_public, verify
from p2pswarm.types import Group, Task

VERSION = 1
MAX_REWARD = 1e6  # a sender's advisory reward; anything larger is not a reward


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 * 1024 * 1024
    max_groups: int = 256
    max_completions: int = 64
    max_text: int = 32 * 1024  # characters per question / answer / completion
    max_meta_bytes: int = 16 * 1024
    max_id: int = 256  # characters of a task id or dataset name
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
    now: float | None = None,
) -> RolloutBatch:
    """Parse and check a batch: size, envelope, version, signature, peer id, swarm, round window, schema.
    Raises WireError, and nothing else, whatever `data` holds."""
    try:
        return _decode(data, swarm, current_round, expect_peer, limits, now)
    except WireError:
        raise
    except V.Invalid as e:
        raise WireError("too_large" if e.reason == "too_large" else "schema", str(e)) from None
    except Exception as e:  # noqa: BLE001 - a check this module forgot must still not raise into a round
        raise WireError("malformed", f"{type(e).__name__}") from None


def _decode(data: Any, swarm: str, current_round: int | None, expect_peer: str | None, limits: Limits,
            now: float | None) -> RolloutBatch:
    if not isinstance(data, (bytes, bytearray)):
        raise WireError("malformed", "not bytes")
    if len(data) > limits.max_bytes:
        raise WireError("too_large", f"{len(data)} bytes")
    env = _unpack(data, "envelope")
    if not isinstance(env, dict):
        raise WireError("malformed", "envelope is not a map")
    if env.get("v") != VERSION or type(env.get("v")) is not int:
        raise WireError("bad_version", V.clip(env.get("v"), 20))
    body, key, sig = env.get("body"), env.get("key"), env.get("sig")
    if not (type(body) is bytes and type(key) is bytes and type(sig) is bytes) or len(key) != 32:
        raise WireError("malformed", "envelope fields")
    if not verify(key, sig, body):
        raise WireError("bad_signature")
    b = _unpack(body, "body")
    if not isinstance(b, dict):
        raise WireError("schema", "body is not a map")
    peer = V.field(b, "peer", V.peer_id)
    if peer != peer_id_from_public(key):
        raise WireError("wrong_peer", "signing key does not belong to the named peer")
    if expect_peer is not None and peer != expect_peer:
        raise WireError("wrong_peer", "sender is not the peer the transport saw")
    if b.get("swarm") != swarm or type(b.get("swarm")) is not str:
        raise WireError("wrong_swarm", V.clip(b.get("swarm")))
    rnd, stage = V.field(b, "round", V.integer, 0), V.field(b, "stage", V.integer, 0)
    if current_round is not None and abs(rnd - current_round) > limits.round_window:
        raise WireError("round_window", f"round {rnd}, current {current_round}")
    created = V.field(b, "created", V.timestamp, now)
    groups_raw = b.get("groups")
    if type(groups_raw) is not list:
        raise WireError("schema", "groups must be a list")
    if len(groups_raw) > limits.max_groups:
        raise WireError("too_large", f"{len(groups_raw)} groups")
    groups = [_group(raw, peer, stage, limits) for raw in groups_raw]
    return RolloutBatch(swarm=swarm, round=rnd, stage=stage, peer=peer, groups=groups, created=created)


def _group(raw: Any, peer: str, stage: int, limits: Limits) -> Group:
    """One group of a batch, every field checked (raises V.Invalid or WireError)."""
    if type(raw) is not dict:
        raise WireError("schema", "group is not a map")
    completions = raw.get("completions")
    if type(completions) is not list or not 1 <= len(completions) <= limits.max_completions:
        raise WireError("schema", "completions")
    for c in completions:
        V.text(c, "completion", limits.max_text)
    rewards = raw.get("rewards", [])
    if type(rewards) is not list or len(rewards) > limits.max_completions:
        raise WireError("schema", "rewards")
    rewards = [V.real(r, "reward", -MAX_REWARD, MAX_REWARD) for r in rewards]
    meta = V.plain(V.mapping(raw.get("meta", {}), "meta"), "meta")
    if len(msgpack.packb(meta)) > limits.max_meta_bytes:
        raise WireError("too_large", "meta")
    recipe = raw.get("recipe")
    if recipe is not None:
        V.plain(V.mapping(recipe, "recipe"), "recipe")
        if len(msgpack.packb(recipe)) > limits.max_meta_bytes:
            raise WireError("too_large", "recipe")
    task = Task(
        task_id=V.field(raw, "id", V.name, limits.max_id),
        dataset=V.field(raw, "dataset", V.text, limits.max_id),
        question=V.field(raw, "question", V.text, limits.max_text),
        answer=V.field(raw, "answer", V.text, limits.max_text),
        metadata=meta,
        stage=stage,
        recipe=recipe,
    )
    if task.dataset and not task.dataset.isprintable():
        raise WireError("schema", "dataset has control characters")
    return Group(task=task, completions=completions, peer=peer, sender_rewards=rewards)


class Inbox:
    """Receiver-side bookkeeping shared by transports: decode, drop replays, count drops by reason."""

    def __init__(self, swarm: str, limits: Limits = Limits()):
        self.swarm = swarm
        self.limits = limits
        self.drops: Counter[str] = Counter()
        self.received = 0
        self.bytes_received = 0
        self.groups_from: Counter[str] = RecentCounter()  # groups accepted, by sending peer (bounded)
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

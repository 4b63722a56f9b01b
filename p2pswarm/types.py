"""The data that flows through a round: tasks, groups of completions, and a round's game state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    """One question to answer. `question` is the full user text for its stage.

    `prompt` (chat messages) is built by the local DataManager and never travels: a swarm task is
    re-templated with the receiver's own prompt format and tokenizer.

    `recipe` says how the task was made (for reasoning-gym: dataset, config, seed, index), so that a
    receiver regenerates it and scores against its own copy of the answer (DataManager.rederive).
    """

    task_id: str
    dataset: str
    question: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    stage: int = 0
    prompt: list[dict[str, str]] | None = None
    recipe: dict[str, Any] | None = None


@dataclass
class Group:
    """A GRPO group: G completions of one task by one peer, with their rewards."""

    task: Task
    completions: list[str]
    peer: str
    rewards: list[float] = field(default_factory=list)
    # Rewards the sender claims for itself; advisory only, never used for training.
    sender_rewards: list[float] = field(default_factory=list)
    # Token ids as sampled (local groups only): training on the exact sampled tokens avoids
    # a decode/re-encode round trip that can change the tokenisation.
    completion_ids: list[list[int]] | None = None

    @property
    def local(self) -> bool:
        return self.completion_ids is not None

    @property
    def has_signal(self) -> bool:
        """False when all rewards are equal: such a group has zero advantage everywhere."""
        return len(self.rewards) > 1 and max(self.rewards) - min(self.rewards) > 1e-9


@dataclass
class GameState:
    """Everything a round produced, stage by stage."""

    round: int
    local: dict[int, list[Group]] = field(default_factory=dict)
    swarm: dict[int, list[Group]] = field(default_factory=dict)

    def add(self, stage: int, local: list[Group], swarm: list[Group]) -> None:
        self.local.setdefault(stage, []).extend(local)
        self.swarm.setdefault(stage, []).extend(swarm)

    def local_groups(self) -> list[Group]:
        return [g for s in sorted(self.local) for g in self.local[s]]

    def swarm_groups(self) -> list[Group]:
        return [g for s in sorted(self.swarm) for g in self.swarm[s]]

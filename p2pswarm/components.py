"""The replaceable parts of a peer. Subclass one, pass it to GameManager, and the round loop uses it.

The round (see GameManager.play_round):

    tasks = data.round_tasks(r)
    for stage s:
        local = trainer.generate(tasks)        # G completions per task, one batched call
        rewards.score(local)                   # sender's own view, sent as advisory
        comm.publish(r, s, local)
        swarm = comm.collect(r, s)             # what others published, within a deadline
        rewards.score(swarm)                   # re-scored locally, never trusted
    trainer.train(state)                       # SAPO: I local + J swarm groups
    coordinator.next_round(r)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pswarm.types import GameState, Group, Task


class DataManager(ABC):
    """Which tasks a round plays, and how a task becomes a prompt."""

    num_stages: int = 1

    @abstractmethod
    def round_tasks(self, round: int) -> list[Task]:
        """Stage-0 tasks of a round; deterministic for a given (seed, round, peer)."""

    def stage_tasks(self, state: GameState, stage: int) -> list[Task]:
        """Tasks of a later stage, built from what earlier stages produced (multi-stage games)."""
        raise NotImplementedError(f"{type(self).__name__} has a single stage")

    @abstractmethod
    def messages(self, task: Task) -> list[dict[str, str]]:
        """Chat messages for a task (the local prompt format; applied to swarm tasks too)."""

    def with_prompts(self, tasks: list[Task]) -> list[Task]:
        """Set each task's prompt from messages(); the one place a task, local or swarm, gets its prompt."""
        for t in tasks:
            t.prompt = self.messages(t)
        return tasks

    def eval_tasks(self) -> list[Task]:
        """A held-out split that is never trained on."""
        return []


class RewardManager(ABC):
    @abstractmethod
    def score(self, groups: list[Group]) -> None:
        """Fill `group.rewards` (one float per completion) for every group, local or swarm."""


@dataclass
class TrainStats:
    loss: float = 0.0
    kl: float = 0.0
    local_groups: int = 0
    swarm_groups: int = 0
    swarm_peers: int = 0
    clip_fraction: float = 0.0
    skipped: bool = False  # no group had a learning signal
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer(ABC):
    """Generation and the policy update; the user owns what happens in train()."""

    @abstractmethod
    def generate(self, tasks: list[Task], progress=None) -> list[Group]:
        """G completions for every task (task.prompt is set)."""

    @abstractmethod
    def train(self, state: GameState, progress=None) -> TrainStats: ...

    @abstractmethod
    def save(self, path: Path) -> None: ...

    @abstractmethod
    def load(self, path: Path) -> None: ...


@dataclass
class PeerInfo:
    peer_id: str
    name: str = ""
    round: int = -1
    last_seen: float = 0.0
    rollouts_received: int = 0


class CommunicationManager(ABC):
    """Moves a stage's groups to and from the swarm."""

    peer_id: str

    @abstractmethod
    def publish(self, round: int, stage: int, groups: list[Group]) -> None: ...

    @abstractmethod
    def collect(self, round: int, stage: int) -> list[Group]:
        """Other peers' groups for (round, stage), gathered until a deadline or a quorum."""

    def peers(self) -> list[PeerInfo]:
        return []

    def counters(self) -> dict[str, int]:
        """Transport counters for metrics (sent, received, dropped by reason, ...)."""
        return {}

    def close(self) -> None:
        pass


class Coordinator(ABC):
    """The swarm's round clock."""

    @abstractmethod
    def start_round(self, resume_from: int) -> int:
        """The round to play first, given the first round this node has not finished."""

    @abstractmethod
    def next_round(self, finished: int) -> int:
        """The round to play after `finished`; may jump ahead (the node skipped rounds), never back."""

    def close(self) -> None:
        pass

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
    coordinator.report_finished(r)             # "I trained round r": what round clocks wait for
    r = coordinator.next_round(r)              # r + 1, or further when the swarm is ahead

The life of one rollout past comm.publish: the transport signs it (p2pswarm.wire), moves the bytes
(comm/inprocess.py, comm/hivemind/, comm/drive/, comm/torchdist/), and the receiver's wire.Inbox checks
size, signature, peer id, swarm, round window, schema and replay before the group reaches the game loop,
which re-scores it locally. What the transports share is in comm/core.py.
"""

from __future__ import annotations

import threading

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pswarm.types import GameState, Group, Task


class DataManager(ABC):
    """Which tasks a round plays, and how a task becomes a prompt.

    A DataManager whose tasks can be regenerated from a recipe they carry sets `rederivable = True` and
    implements rederive(): the transport calls it for every swarm group it accepted, and a group whose
    task does not regenerate to the same question is dropped (`dropped_bad_task`), so that rewards are
    always computed against the receiver's own answer, never the sender's. Swarm groups of a DataManager
    that cannot re-derive its tasks are refused, unless the `accept_unverified_tasks` setting says to
    trust senders' answers (the SAPO paper's protocol; anyone in the swarm can then poison rewards).
    """

    num_stages: int = 1
    rederivable: bool = False

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

    def rederive(self, task: Task) -> Task | None:
        """This peer's own copy of a swarm task, made from `task.recipe` (question, answer and metadata all
        from the local generator), or None when the recipe is unknown here, invalid, or regenerates to a
        different question. Called from a transport's thread for every accepted group; never raises."""
        return None


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
    """Generation and the policy update; the user owns what happens in train().

    The game loop calls, each round: generate() once per stage (task.prompt set, local tasks only), then
    train() once with the whole round's state (local and swarm groups, rewards filled in), then
    evaluate() every `eval_every` rounds. save()/load() write and read a checkpoint folder; load() is
    called once, before the first round, when the run folder has a checkpoint.
    """

    # Figures of the last generate() call ({"seconds", "tokens", "tokens_per_s"}) for the round's metrics.
    last_generate: dict[str, float] = {}

    @abstractmethod
    def generate(self, tasks: list[Task], progress=None) -> list[Group]:
        """G completions for every task (task.prompt is set)."""

    @abstractmethod
    def train(self, state: GameState, progress=None) -> TrainStats: ...

    def evaluate(self, tasks: list[Task], score) -> dict[str, float]:
        """Held-out figures (`eval_*` keys) for tasks never trained on; `score(task, completion)` -> reward.
        The default measures nothing."""
        return {}

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
    ignored: str = ""  # why this node ignores the peer for now (it sent invalid data), else ""


class CommunicationManager(ABC):
    """Moves a stage's groups to and from the swarm. Transports build on comm/core.py's SignedTransport.

    publish(r, s, groups) is called once per exchanged stage, before collect(r, s). It signs the groups
    as one batch (p2pswarm.wire) and makes the bytes available to the swarm; it never raises for a
    network failure of its own (it logs one line and the round goes on without this batch).

    collect(r, s) returns other peers' groups for exactly (r, s), and promises:
      - deadline: it returns within its timeout (collect_timeout) whatever the swarm does;
      - quorum: it returns earlier once `collect_need` (comm/core.py) valid batches arrived: every live
        peer expected to publish (r, s), or `collect_peers` of them;
      - validity: every group passed wire.Inbox (size, signature, peer id = the sender the medium
        authenticated, swarm, round window, schema); one batch per sender per (r, s) — replays dropped;
      - drops: anything invalid is dropped and counted by reason in counters() and under its sender in
        counters()["per_peer"]; nothing a peer sends raises into the round.
    Rewards in the returned groups are empty: the game loop re-scores them locally.

    peers() lists the other live peers (PeerInfo) for the UI; counters() feeds the round's metrics;
    close() says goodbye to the swarm (if the medium has presence) and releases the medium.
    """

    peer_id: str

    @abstractmethod
    def publish(self, round: int, stage: int, groups: list[Group]) -> None: ...

    @abstractmethod
    def collect(self, round: int, stage: int) -> list[Group]:
        """Other peers' groups for (round, stage), gathered until a deadline or a quorum."""

    def peers(self) -> list[PeerInfo]:
        return []

    def counters(self) -> dict[str, Any]:
        """Transport counters for metrics (sent, received, dropped by reason, per peer, ...)."""
        return {}

    def check_tasks_with(self, check) -> None:
        """Called once by the game loop: `check(task)` returns the receiver's own copy of a swarm task, or
        None to drop its group (`dropped_bad_task`). A transport applies it to every group it accepts."""
        raise NotImplementedError(f"{type(self).__name__} does not check swarm tasks")

    def set_ban_policy(self, strikes: int, seconds: float) -> None:
        """How many offenses ban a peer, and for how long at first (comm/core.py PeerLedger)."""

    def set_paused(self, paused: bool) -> None:
        """The node's user paused it (True, between rounds) or resumed it (False): a transport whose peers
        wait for each other tells them not to wait for this one meanwhile."""

    def note_exit(self, why: str) -> None:
        """The node is going down for `why` (a crash): a transport whose peers wait in lockstep tells them."""

    def serve_last_round(self, round: int, stop: threading.Event) -> None:
        """Called once by the game loop after the node's last round (its round limit, not a stop request),
        before close: a transport whose peers fetch batches from their author keeps serving round `round`
        while peers still play it, bounded by its collect timeout; it returns at once when `stop` is set."""

    def close(self) -> None:
        pass


class Coordinator(ABC):
    """The swarm's round clock.

    start_round(first) is called once, before the first round, with the first round this node has not
    finished; report_finished(r) after the node trained round r (before its checkpoint); next_round(r)
    right after that. A clock never goes back: next_round returns at least r + 1, and more when the swarm
    is ahead (the game loop then reports the skipped rounds). Clocks that decide when a round is over do
    it with comm/core.py's `should_advance`: a quorum of the round's active trainers finished it, or the
    round deadline passed since the first one did.
    """

    @abstractmethod
    def start_round(self, resume_from: int) -> int:
        """The round to play first, given the first round this node has not finished."""

    def report_finished(self, round: int) -> None:
        """Tell the swarm this node trained `round` (what a keeper's quorum counts). Default: nobody listens."""

    @abstractmethod
    def next_round(self, finished: int) -> int:
        """The round to play after `finished`; may jump ahead (the node skipped rounds), never back."""

    def interrupt(self) -> None:
        """A stop request arrived (any thread): a wait inside next_round returns at once. Default: no waits."""

    def bind_stop(self, wants_stop, stop) -> None:
        """For clocks that share stop requests between lockstep peers: `wants_stop()` says whether this node
        wants to stop; `stop()` stops it when any peer did."""

    def close(self) -> None:
        pass

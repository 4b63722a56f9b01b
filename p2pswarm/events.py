"""The node's event stream: the headless printer, the JSONL log and the TUI all consume the same events."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Events a user cares about; "progress" is high-frequency and is not written to events.jsonl.
NODE_STARTED = "node_started"
ROUND_STARTED = "round_started"
PROGRESS = "progress"
ROLLOUTS_RECEIVED = "rollouts_received"
ROUND_FINISHED = "round_finished"
ROUNDS_SKIPPED = "rounds_skipped"  # first, last (inclusive), count = last - first + 1: a span, never a list
CHECKPOINT_SAVED = "checkpoint_saved"
RESUMED = "resumed"
EVALUATED = "evaluated"
PAUSED = "paused"
NODE_STOPPED = "node_stopped"
ERROR = "error"
# A bounded sample of a stage's groups with their texts, for the TUI's rollout browser; like progress,
# it is not written to events.jsonl (texts would bloat it).
ROLLOUTS = "rollouts"
_NOT_LOGGED = frozenset({PROGRESS, ROLLOUTS})


@dataclass
class Event:
    kind: str
    peer: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


log = logging.getLogger(__name__)

Listener = Callable[[Event], None]


class EventBus:
    def __init__(self, peer: str = ""):
        self.peer = peer
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._failed: set[tuple[int, str]] = set()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, kind: str, **data: Any) -> Event:
        """Hand the event to every listener. A listener that fails (a full disk under events.jsonl, a UI that
        went away) is logged, once per listener and kind of error, and the others still get the event: an
        observer never stops the round loop that emits."""
        event = Event(kind=kind, peer=self.peer, data=data)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception as e:  # noqa: BLE001 - whatever a listener raises is its own trouble
                key = (id(listener), type(e).__name__)
                if key not in self._failed:
                    self._failed.add(key)
                    log.warning("event listener %s failed on %s: %s: %s (further such failures are not logged)",
                                getattr(listener, "__qualname__", type(listener).__name__), kind,
                                type(e).__name__, e)
        return event


class JsonlEventLog:
    """Appends every event but progress ticks and rollout samples to events.jsonl, one JSON object a line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.kind in _NOT_LOGGED:
            return
        line = json.dumps({"time": round(event.time, 3), "kind": event.kind, "peer": event.peer, **event.data}, default=str)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")


def span_text(first: int, last: int) -> str:
    """A ROUNDS_SKIPPED span for a log line: "[5] (1 round)", "[5..9] (5 rounds)"."""
    count = last - first + 1
    return f"[{first}] (1 round)" if count == 1 else f"[{first}..{last}] ({count} rounds)"


def peer_rewards(groups) -> dict[str, float]:
    """Mean reward of each sender's groups (as this node scored them), by peer id."""
    by_peer: dict[str, list[float]] = {}
    for g in groups:
        by_peer.setdefault(g.peer, []).extend(g.rewards)
    return {p: sum(r) / len(r) for p, r in by_peer.items() if r}


def rollout_sample(local, swarm, per_side: int = 4, max_chars: int = 600) -> dict[str, Any]:
    """The data of a ROLLOUTS event: counts, and up to `per_side` local and `per_side` swarm groups
    (taken round-robin over senders) with truncated texts."""
    by_peer: dict[str, list] = {}
    for g in swarm:
        by_peer.setdefault(g.peer, []).append(g)
    picked, queues = [], list(by_peer.values())
    while queues and len(picked) < per_side:
        for q in list(queues):
            if len(picked) < per_side:
                picked.append(q.pop(0))
            if not q:
                queues.remove(q)
    cut = lambda text: text if len(text) <= max_chars else text[: max_chars - 1] + "…"  # noqa: E731
    samples = [
        {"peer": g.peer, "local": is_local, "task_id": g.task.task_id, "dataset": g.task.dataset,
         "question": cut(g.task.question), "answer": cut(str(g.task.answer)),
         "completions": [cut(c) for c in g.completions], "rewards": list(g.rewards)}
        for is_local, groups in ((True, local[:per_side]), (False, picked))
        for g in groups
    ]
    return {"local_groups": len(local), "swarm_groups": len(swarm), "samples": samples}

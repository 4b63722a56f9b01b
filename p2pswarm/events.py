"""The node's event stream: the headless printer, the JSONL log and the TUI all consume the same events."""

from __future__ import annotations

import json
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
ROUNDS_SKIPPED = "rounds_skipped"
CHECKPOINT_SAVED = "checkpoint_saved"
RESUMED = "resumed"
EVALUATED = "evaluated"
PAUSED = "paused"
NODE_STOPPED = "node_stopped"
ERROR = "error"


@dataclass
class Event:
    kind: str
    peer: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


Listener = Callable[[Event], None]


class EventBus:
    def __init__(self, peer: str = ""):
        self.peer = peer
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, kind: str, **data: Any) -> Event:
        event = Event(kind=kind, peer=self.peer, data=data)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        return event


class JsonlEventLog:
    """Appends every event but progress ticks to events.jsonl, one JSON object a line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.kind == PROGRESS:
            return
        line = json.dumps({"time": round(event.time, 3), "kind": event.kind, "peer": event.peer, **event.data}, default=str)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")

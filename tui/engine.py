"""The engine side of the UI: builds the node's agents and runs them off the UI thread.

Everything the UI shows comes from here, either as messages (the node's events, log records, "built",
"failed", "finished") or from thread-safe queries of the running agent (`comm.peers()`, `round`,
`paused`). The UI never trains, never waits on training, and keeps no state the engine does not have.

The engine runs in a daemon thread of its own rather than a Textual thread worker: those run in the
asyncio default executor, whose threads the interpreter joins at exit, so a node stuck in a long step
would keep the process alive after the user chose to leave anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from textual.message import Message

from p2pswarm import events as ev
from p2pswarm.errors import UserError
from p2pswarm.events import Event
from p2pswarm.settings import Settings

log = logging.getLogger("p2pswarm.tui")

# Progress ticks arrive once per decoding step; the UI needs a few per second at most.
PROGRESS_INTERVAL = 0.1


# ---- messages (posted from engine threads; Textual's post_message is thread-safe) ------------------
class NodeBuilt(Message):
    """The agents are built (model loaded); the run starts right after."""


class NodeFailed(Message):
    """The node could not be built: a one-line reason for the user (bad model, preset, identity...)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class Forwarded(Message, bubble=False):
    """A message the App hands to the dashboard, which hands it to its panels. Messages bubble up the DOM,
    never down, so each delivery is a post of its own; one that bubbled back up would be forwarded again."""

    def __init_subclass__(cls, bubble: bool | None = False, **kw) -> None:  # Message resets it to True
        super().__init_subclass__(bubble=bubble, **kw)


class LogLine(Forwarded):
    def __init__(self, text: str, level: int = logging.INFO) -> None:
        super().__init__()
        self.text = text
        self.level = level


class EngineFinished(Forwarded):
    """Every agent has stopped (final checkpoints written); `error` is set if the run failed."""

    def __init__(self, error: str | None) -> None:
        super().__init__()
        self.error = error


class ChainState(Forwarded):
    """A reading of the chain clock (settings.chain): its round and stage, this node's registration, or why
    the chain did not answer (p2pswarm.comm.chain.coordinator.ChainStatus)."""

    def __init__(self, status) -> None:
        super().__init__()
        self.status = status


# ---- the watched node's events, one message type per kind (made in node_message) --------------------
@dataclass(kw_only=True)
class NodeEvent(Forwarded):
    """An event of the watched node. `at` is when the node emitted it (Message.time is when it was posted)."""

    at: float = field(default_factory=time.time)


@dataclass(kw_only=True)
class NodeStarted(NodeEvent):
    name: str
    peer: str
    first_round: int
    model: str


@dataclass(kw_only=True)
class RoundStarted(NodeEvent):
    round: int


@dataclass(kw_only=True)
class Progress(NodeEvent):
    """A step of the phase in progress: generate, collect or train (`done` of `total`)."""

    round: int
    stage: int | None
    phase: str
    done: float
    total: float


@dataclass(kw_only=True)
class RolloutsReceived(NodeEvent):
    """The swarm's groups for a stage arrived; `peer_rewards`: each sender's mean, as this node scored it."""

    round: int
    stage: int
    peer_rewards: dict[str, float]


@dataclass(kw_only=True)
class Rollouts(NodeEvent):
    """A bounded sample of a stage's groups, local and from the swarm, with their texts."""

    round: int
    stage: int
    local_groups: int
    swarm_groups: int
    samples: list[dict]


@dataclass(kw_only=True)
class RoundFinished(NodeEvent):
    """A round is trained: its metrics, the row metrics.jsonl got."""

    metrics: dict

    @property
    def round(self) -> int:
        return self.metrics["round"]


@dataclass(kw_only=True)
class RoundsSkipped(NodeEvent):
    first: int  # the span of rounds skipped, both ends included (never a list: a jump may be millions)
    last: int


@dataclass(kw_only=True)
class CheckpointSaved(NodeEvent):
    round: int
    path: str


@dataclass(kw_only=True)
class Resumed(NodeEvent):
    round: int
    checkpoint: str


@dataclass(kw_only=True)
class Evaluated(NodeEvent):
    round: int
    scores: dict[str, float]


@dataclass(kw_only=True)
class Paused(NodeEvent):
    round: int
    paused: bool


@dataclass(kw_only=True)
class NodeStopped(NodeEvent):
    round: int
    clean: bool


@dataclass(kw_only=True)
class NodeError(NodeEvent):
    message: str


def node_message(e: Event) -> NodeEvent | None:
    """The message for one of the node's events; None for a kind the UI does not show. The one place
    that reads event kinds: everything past it dispatches on the message's type."""
    d, at = e.data, e.time
    match e.kind:
        case ev.NODE_STARTED:
            return NodeStarted(name=d["name"], peer=e.peer, first_round=d["first_round"], model=d["model"], at=at)
        case ev.ROUND_STARTED:
            return RoundStarted(round=d["round"], at=at)
        case ev.PROGRESS:
            return Progress(round=d["round"], stage=d.get("stage"), phase=d["phase"], done=d["done"],
                            total=d["total"], at=at)
        case ev.ROLLOUTS_RECEIVED:
            return RolloutsReceived(round=d["round"], stage=d.get("stage", 0), peer_rewards=d.get("peer_rewards", {}),
                                    at=at)
        case ev.ROLLOUTS:
            return Rollouts(round=d["round"], stage=d["stage"], local_groups=d["local_groups"],
                            swarm_groups=d["swarm_groups"], samples=d["samples"], at=at)
        case ev.ROUND_FINISHED:
            return RoundFinished(metrics=d, at=at)
        case ev.ROUNDS_SKIPPED:
            return RoundsSkipped(first=d["first"], last=d["last"], at=at)
        case ev.CHECKPOINT_SAVED:
            return CheckpointSaved(round=d["round"], path=d["path"], at=at)
        case ev.RESUMED:
            return Resumed(round=d["round"], checkpoint=d["checkpoint"], at=at)
        case ev.EVALUATED:
            return Evaluated(round=d["round"], scores={k: v for k, v in d.items() if k != "round"}, at=at)
        case ev.PAUSED:
            return Paused(round=d["round"], paused=d["paused"], at=at)
        case ev.NODE_STOPPED:
            return NodeStopped(round=d["round"], clean=d.get("clean", False), at=at)
        case ev.ERROR:
            return NodeError(message=d["message"], at=at)
    return None


Sink = Callable[[Message], None]


class UILogHandler(logging.Handler):
    """Log records of the engine, as LogLine messages, instead of lines written over the screen."""

    def __init__(self, sink: Sink) -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.setFormatter(_Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) if not record.exc_info else self.format(_no_traceback(record))
            self.sink(LogLine(text, record.levelno))
        except Exception:  # noqa: BLE001 - a log line must never break the engine
            pass


class _Formatter(logging.Formatter):
    """Time and message; the level only when it is a warning or worse."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp, _, msg = text.partition(" ")
            text = f"{stamp} {record.levelname} {msg}"
        return text


def _no_traceback(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its exception as one line: a traceback is for a file, not for the UI."""
    exc = record.exc_info[1] if record.exc_info else None
    copy = logging.makeLogRecord(record.__dict__)
    copy.exc_info = copy.exc_text = None
    if exc is not None:
        copy.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
        copy.args = None
    return copy


def describe_error(e: BaseException) -> str:
    """The one line the UI shows for an engine error: a `UserError`'s message as it is (it names the cause),
    anything else keeps its class name (a bug; a bare message such as a KeyError's `'x'` says nothing alone)."""
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class Engine:
    """`settings.agents` agents of the in-process swarm; the UI watches agent `watch`.

    Thread-safe for the UI: start(), stop(), pause(), resume(), and the read-only properties.
    """

    def __init__(self, settings: Settings, *, rounds: int | None = None, watch: int = 0, mode: str = "local",
                 swarm: str = "new local swarm") -> None:
        self.settings = settings
        self.rounds = rounds if rounds is not None else settings.rounds
        self.watch = watch
        self.mode = mode
        self.swarm = swarm
        self.agents: list = []
        self.error: str | None = None
        self._sink: Sink | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested = False
        self._last_progress = 0.0
        self._chain_wake = threading.Event()  # set: read the chain now (a round started or ended)
        self._finished = threading.Event()

    # ---- queries ----------------------------------------------------------------------------------
    @property
    def agent(self):
        """The watched GameManager (None until built)."""
        return self.agents[self.watch] if self.agents else None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    @property
    def paused(self) -> bool:
        a = self.agent
        return a is not None and a.paused

    # ---- control ----------------------------------------------------------------------------------
    def start(self, sink: Sink) -> None:
        """Build and run in a daemon thread; everything is reported to `sink` (from that thread)."""
        self._sink = sink
        self._thread = threading.Thread(target=self._main, name="p2pswarm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Graceful: every agent finishes its current step, writes a checkpoint and leaves the swarm."""
        self._stop_requested = True
        for a in self.agents:
            a.request_stop()

    def pause(self) -> None:
        """Pause every agent of this process after its current round (the UI shows them as one node)."""
        for a in self.agents:
            a.pause()

    def resume(self) -> None:
        for a in self.agents:
            a.resume_training()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    # ---- the thread -------------------------------------------------------------------------------
    def _post(self, message: Message) -> None:
        if self._sink is not None:
            try:
                self._sink(message)
            except RuntimeError:  # the UI's event loop is gone (the app exited): nobody is watching
                pass

    def _listener(self, event: Event) -> None:
        try:
            message = node_message(event)
        except Exception:  # noqa: BLE001 - this runs in the agent's thread: the UI must never break training
            log.exception("the UI could not read a %s event", event.kind)
            return
        if isinstance(message, Progress):  # the first and last tick of a phase always; between them, a few a second
            now = time.monotonic()
            if message.done not in (0, message.total) and now - self._last_progress < PROGRESS_INTERVAL:
                return
            self._last_progress = now
        if isinstance(message, (RoundStarted, RoundFinished)):
            self._chain_wake.set()
        if message is not None:
            self._post(message)

    def _watch_chain(self, coordinator) -> None:
        """Reads the chain clock every chain_poll seconds, and at once when a round starts or ends, in a
        daemon thread of its own: an RPC may take seconds (or its timeout), and neither the UI nor
        training waits on it. Posts each reading that differs from the last."""
        last = None
        while not self._finished.is_set():
            self._chain_wake.clear()
            status = coordinator.status()  # never raises: a failure is a state of the reading
            if status != last:
                self._post(ChainState(status))
                last = status
            self._chain_wake.wait(self.settings.chain_poll)

    def _main(self) -> None:
        from p2pswarm.node import build_swarm, run_agents

        try:
            log.info("loading %s for %d agent(s)", self.settings.model, self.settings.agents)
            agents = build_swarm(self.settings)
        except Exception as e:  # noqa: BLE001 - shown to the user as one line
            self.error = describe_error(e)
            self._post(NodeFailed(self.error))
            return
        self.agents = agents
        self.agent.events.subscribe(self._listener)  # before the run: no event is missed
        if self._stop_requested:
            self.stop()
        self._post(NodeBuilt())
        if self.settings.chain:  # the chain's round replaced the transport's clock (node.build_agent)
            threading.Thread(target=self._watch_chain, args=(self.agent.coordinator,), name="p2pswarm-chain-status",
                             daemon=True).start()
        for a in agents:
            log.info("%s: output in %s", a.name, a.run_dir.path)
        try:
            run_agents(agents, self.rounds)
        except BaseException as e:  # noqa: BLE001 - run_agents logged it and emitted an error event
            self.error = describe_error(e)
        self._finished.set()
        self._chain_wake.set()
        self._post(EngineFinished(self.error))

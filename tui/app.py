"""The Textual application: the join screen, then the dashboard of the node it started."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import deque
from dataclasses import dataclass

from textual.app import App

from tui.dashboard import DashboardScreen
from tui.engine import Engine, EngineFinished, LogLine, NodeBuilt, NodeEvent, NodeFailed, UILogHandler
from tui.join import JoinScreen, SettingsFactory


@dataclass
class Outcome:
    """What the app returns when it exits (the CLI prints it on the restored terminal)."""

    started: bool = False
    last_round: int | None = None
    checkpoint: str | None = None
    run_dir: str | None = None
    error: str | None = None
    forced: bool = False


class SwarmApp(App[Outcome]):
    """`SwarmApp(factory)` opens the join screen; `autostart=True` starts at once with the factory's
    settings (the demo). `factory(**overrides)` returns Settings (p2pswarm.settings.load_settings)."""

    CSS_PATH = "swarm.tcss"
    TITLE = "p2pswarm"
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, factory: SettingsFactory, *, autostart: bool = False, rounds: int | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.autostart = autostart
        self.rounds = rounds
        self.engine: Engine | None = None
        self.dashboard: DashboardScreen | None = None
        self.quitting = False
        self.outcome = Outcome()
        self._early_log: deque[tuple[str, int]] = deque(maxlen=200)
        self._log_handler: UILogHandler | None = None
        self._sigterm = False
        self._engine_logger = logging.getLogger("p2pswarm")
        self._saved_logger_state = (self._engine_logger.level, self._engine_logger.propagate)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def on_mount(self) -> None:
        # The engine's log records become lines in the log panel, never text written over the screen.
        self._log_handler = UILogHandler(self._post)
        self._engine_logger.addHandler(self._log_handler)
        self._engine_logger.setLevel(logging.INFO)
        self._engine_logger.propagate = False
        # SIGTERM (kill, a service manager) stops as gracefully as the quit key, as in the headless run.
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.call_later, self.action_quit)
            self._sigterm = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            self._sigterm = False
        self.push_screen(JoinScreen(self.factory, autostart=self.autostart, rounds=self.rounds))

    def on_unmount(self) -> None:
        if self._sigterm:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        if self._log_handler is not None:
            self._engine_logger.removeHandler(self._log_handler)
            self._engine_logger.setLevel(self._saved_logger_state[0])
            self._engine_logger.propagate = self._saved_logger_state[1]

    def _post(self, message) -> None:
        """Thread-safe delivery of an engine message (post_message hands it to the UI loop)."""
        self.post_message(message)

    def start_engine(self, engine: Engine) -> None:
        self.engine = engine
        engine.start(self._post)

    # ---- engine messages ------------------------------------------------------------------------------
    def on_node_failed(self, message: NodeFailed) -> None:
        self.engine = None
        self.outcome.error = message.reason
        if self.quitting:
            self.exit(self.outcome)
            return
        if isinstance(self.screen, JoinScreen):
            self.screen.failed(message.reason)

    async def on_node_built(self, message: NodeBuilt) -> None:
        assert self.engine is not None
        self.outcome.started, self.outcome.error = True, None
        self.outcome.run_dir = str(self.engine.agent.run_dir.path)
        self.dashboard = DashboardScreen(self.engine)
        await self.switch_screen(self.dashboard)  # mounted before the next engine message is handled
        for text, level in self._early_log:
            self.dashboard.log_line(text, level)
        self._early_log.clear()
        if self.quitting:
            self.dashboard.set_status("■ stopping: finishing the step, writing a checkpoint…", "bold yellow")

    def on_node_event(self, message: NodeEvent) -> None:
        e = message.event
        if e.kind == "checkpoint_saved":
            self.outcome.checkpoint = e.data["path"]
        elif e.kind == "node_stopped":
            self.outcome.last_round = e.data["round"]
        if self.dashboard is not None:
            self.dashboard.consume(e)

    def on_log_line(self, message: LogLine) -> None:
        if self.dashboard is not None:
            self.dashboard.log_line(message.text, message.level)
        else:
            self._early_log.append((message.text, message.level))

    def on_engine_finished(self, message: EngineFinished) -> None:
        self.outcome.error = message.error
        if self.quitting:
            self.exit(self.outcome)
        elif self.dashboard is not None:
            self.dashboard.engine_finished(message.error)

    # ---- quit ------------------------------------------------------------------------------------------
    async def action_quit(self) -> None:
        """Graceful: the node finishes its step, writes a checkpoint and leaves; then the app exits.
        Pressed again while stopping, the app leaves at once."""
        engine = self.engine
        if engine is None or not engine.alive:
            self.exit(self.outcome)
            return
        if self.quitting:
            self.outcome.forced = True
            self.exit(self.outcome)
            return
        self.quitting = True
        engine.stop()
        if self.dashboard is not None:
            self.dashboard.set_status("■ stopping: finishing the step, writing a checkpoint… (q again: now)",
                                      "bold yellow")

"""The Textual application: the join screen, then the dashboard of the node it started."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from textual import on
from textual.app import App
from textual.reactive import var

from tui.dashboard import DashboardScreen
from tui.engine import (CheckpointSaved, Engine, EngineFinished, Forwarded, NodeBuilt, NodeFailed, NodeStopped,
                        UILogHandler)
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

    quitting = var(False)  # the node was asked to stop; the dashboard shows it (and q again leaves at once)

    def __init__(self, factory: SettingsFactory, *, autostart: bool = False, rounds: int | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.autostart = autostart
        self.rounds = rounds
        self.engine: Engine | None = None
        self.dashboard: DashboardScreen | None = None
        self.outcome = Outcome()
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
        # Made now, shown once the node is built: what the engine posts meanwhile (its log) waits in the
        # screen's message queue, which Textual processes after the screen is mounted.
        self.dashboard = DashboardScreen(engine)
        engine.start(self._post)

    # ---- engine messages ------------------------------------------------------------------------------
    def on_node_failed(self, message: NodeFailed) -> None:
        self.engine = self.dashboard = None
        self.outcome.error = message.reason
        if self.quitting:
            self.exit(self.outcome)
            return
        if isinstance(self.screen, JoinScreen):
            self.screen.failed(message.reason)

    async def on_node_built(self, message: NodeBuilt) -> None:
        assert self.engine is not None and self.dashboard is not None
        self.outcome.started, self.outcome.error = True, None
        self.outcome.run_dir = str(self.engine.agent.run_dir.path)
        await self.switch_screen(self.dashboard)

    @on(Forwarded)
    def _to_dashboard(self, message: Forwarded) -> None:
        """The node's events, log lines and end: the dashboard shows them."""
        if self.dashboard is not None:
            self.dashboard.post_message(message)

    def on_checkpoint_saved(self, message: CheckpointSaved) -> None:
        self.outcome.checkpoint = message.path

    def on_node_stopped(self, message: NodeStopped) -> None:
        self.outcome.last_round = message.round

    def on_engine_finished(self, message: EngineFinished) -> None:
        self.outcome.error = message.error
        if self.quitting:
            self.exit(self.outcome)

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
        engine.stop()
        self.quitting = True

"""The dashboard: header, peers, rewards, training, rollouts and log, live from the watched node."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from tui.engine import (ChainState, EngineFinished, LogLine, NodeError, NodeEvent, NodeStopped, Paused, Progress,
                        RoundFinished, RoundStarted)
from tui.fmt import shown
from tui.widgets import (ERROR, FINISHED, PAUSED, PAUSING, RUNNING, STOPPED_BY_ERROR, STOPPING, STOPPING_NOW,
                         HeaderBar, LogPanel, PeersTable, RewardPlot, RolloutsBrowser, RolloutsTable, Status,
                         TrainingPanel, render_rollout)

PANELS = ("swarm", "rollouts", "log")
PANEL_TITLES = {"swarm": "swarm", "rollouts": "rollouts", "log": "log"}
# The panels that show the node's events: each declares handlers for the message types it draws.
FEEDS = "PeersTable, RewardPlot, TrainingPanel, RolloutsBrowser, LogPanel"

# Keys of the focused panel (DataTable's and RichLog's own bindings), not of this screen.
PANEL_KEYS = (("↑ ↓ pgup pgdn", "move in the focused table or log"), ("enter", "on a rollout: the whole group"))

ABOUT_PANELS = """\
[b]swarm[/]      peers (you first), reward per round, last update
[b]rollouts[/]   recent groups, yours and the swarm's, scored here
[b]log[/]        a line per round, and the node's log records

A terminal of 140×36 or more shows every panel at once."""


def help_text(bindings: list[Binding], key_display) -> str:
    """The dashboard's keys, from its bindings: a binding's tooltip says what it does; a group of bindings
    shares one line; a binding with neither (an alias such as ctrl+c) is left out."""
    rows: dict[object, tuple[list[str], str]] = {}
    for b in bindings:
        if b.group is not None:
            rows.setdefault(b.group, ([], b.group.description))[0].append(key_display(b))
        elif b.tooltip:
            rows[b] = ([key_display(b)], b.tooltip)
    lines = [(" ".join(keys), text) for keys, text in rows.values()]
    lines[-1:-1] = PANEL_KEYS  # before the help key itself, the last binding
    width = max(len(keys) for keys, _ in lines) + 2
    out = ["[b]p2pswarm dashboard[/]", ""]
    for keys, text in lines:
        first, *rest = text.split("\n")
        out.append(f"[b]{escape(keys)}[/]{' ' * (width - len(keys))}{escape(first)}")
        out += [" " * width + escape(line) for line in rest]
    return "\n".join(out) + "\n\n" + ABOUT_PANELS + "\n"


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark,enter", "dismiss", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(self.text, id="help-text")


class RolloutScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close")]

    def __init__(self, sample: dict, who: str) -> None:
        super().__init__()
        self.sample, self.who = sample, who

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="rollout-box"):
            yield Static(render_rollout(self.sample, self.who))

    def on_mount(self) -> None:
        self.query_one("#rollout-box").focus()


PANEL_KEY = Binding.Group("swarm · rollouts · log panel")


class DashboardScreen(Screen):
    """The watched node's state lives in reactives here; the header is bound to them, and the panels
    handle the node's messages, which this screen hands on."""

    BINDINGS = [
        Binding("p", "toggle_pause", "Pause/resume", tooltip="pause / resume training (after the current round)"),
        Binding("q", "app.quit", "Quit", tooltip="quit: finish the step, write a checkpoint, leave\n"
                                                 "(q again while stopping: leave at once)"),
        Binding("ctrl+c", "app.quit", "Quit", show=False),
        Binding("1", "panel('swarm')", "Swarm", show=False, group=PANEL_KEY),
        Binding("2", "panel('rollouts')", "Rollouts", show=False, group=PANEL_KEY),
        Binding("3", "panel('log')", "Log", show=False, group=PANEL_KEY),
        Binding("tab", "cycle_panel(1)", "Panels", priority=True, tooltip="next panel (shift+tab: previous)"),
        Binding("shift+tab", "cycle_panel(-1)", "Prev panel", show=False, priority=True),
        Binding("question_mark", "help", "Help", tooltip="this help (esc closes)"),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]

    round = reactive(-1)  # -1: no round yet
    stage = reactive(0)
    phase = reactive("idle")  # generate, collect, train or idle
    progress = reactive((0.0, 1.0))  # (done, total) of the phase in progress
    status = reactive(RUNNING)
    finished = reactive(False)  # the engine has stopped
    chain = reactive(None)  # the chain clock's last reading (tui.engine.ChainState), with settings.chain
    # The panel shown (or focused, when all are); choosing it again focuses it again.
    active = reactive("swarm", always_update=True)

    def __init__(self, engine) -> None:
        super().__init__()
        self.engine = engine

    def compose(self) -> ComposeResult:
        yield HeaderBar(self.engine, id="header").data_bind(
            DashboardScreen.round, DashboardScreen.stage, DashboardScreen.phase, DashboardScreen.progress,
            DashboardScreen.status, DashboardScreen.chain)
        yield Static(id="panel-tabs")
        with Vertical(id="body"):
            with Vertical(id="swarm-panel", classes="panel"):
                yield PeersTable(id="peers")
                with Horizontal(id="charts"):
                    yield RewardPlot(id="plot")
                    yield TrainingPanel(id="training")
            yield RolloutsBrowser(id="rollouts-panel", classes="panel")
            yield LogPanel(id="log-panel", classes="panel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#peers").border_title = "peers"
        # five series do not fit one border of an 80-column plot: this node's on top, the others below
        self.query_one("#plot").border_title = "rewards  " + RewardPlot.legend(0, 2)
        self.query_one("#plot").border_subtitle = RewardPlot.legend(2)
        self.query_one("#training").border_title = "training"
        self.query_one("#rollouts-panel").border_title = "rollouts"
        self.query_one("#log-panel").border_title = "log"
        if self.engine.stopping:  # quit was asked for while the node was being built
            self.status = STOPPING
        self.watch(self.app, "quitting", self._quitting, init=False)
        a = self.engine.agent
        if a is not None:
            self.query_one(RewardPlot).prefill(a.run_dir.read_metrics())
        self.query_one(RewardPlot).replot()
        self.refresh_live()
        self.set_interval(1.0, self.refresh_live)

    # ---- the node's messages ------------------------------------------------------------------------
    @on(NodeEvent)
    @on(LogLine)
    def _to_panels(self, message: NodeEvent | LogLine) -> None:
        # Messages bubble up the DOM, never down: each panel gets a post of its own (none bubbles back up).
        for panel in self.query(FEEDS):
            panel.post_message(message)

    def on_round_started(self, message: RoundStarted) -> None:
        self.round, self.stage, self.phase, self.progress = message.round, 0, "generate", (0, 1)

    def on_progress(self, message: Progress) -> None:
        self.round = message.round
        if message.stage is not None:
            self.stage = message.stage
        # Generation done: the node is sharing its rollouts and waiting for the swarm's.
        generated = message.phase == "generate" and message.done >= message.total
        self.phase = "collect" if generated else message.phase
        self.progress = (message.done, message.total)

    def on_round_finished(self, message: RoundFinished) -> None:
        self.round, self.phase, self.progress = message.round, "idle", (1, 1)

    def on_chain_state(self, message: ChainState) -> None:
        self.chain = message.status

    def on_paused(self, message: Paused) -> None:
        self.status = PAUSED if message.paused else RUNNING

    def on_node_stopped(self, message: NodeStopped) -> None:
        self.phase = "idle"
        self.status = Status(f"■ stopped after round {message.round}", "bold")

    def on_node_error(self, message: NodeError) -> None:
        self.status = ERROR  # the message: in the log, and notified when the engine has stopped

    def on_engine_finished(self, message: EngineFinished) -> None:
        self.finished = True
        if message.error:
            self.status = STOPPED_BY_ERROR
            self.notify(shown(message.error), title="the node stopped", severity="error", timeout=60, markup=False)
        elif not self.engine.stopping:
            self.status = FINISHED

    def _quitting(self, quitting: bool) -> None:
        if quitting:
            self.status = STOPPING_NOW

    def refresh_live(self) -> None:
        """Live values the engine knows now: the peer list, last-seen times."""
        peers = self.query_one(PeersTable)
        peers.refresh_from(self.engine)
        self.query_one(RolloutsBrowser).names = peers.names

    # ---- keys -----------------------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        if self.finished or self.engine.stopping or self.engine.agent is None:
            return
        if self.engine.paused:
            self.engine.resume()
            self.status = RUNNING
        else:
            self.engine.pause()
            self.status = PAUSING

    def action_panel(self, name: str) -> None:
        self.active = name

    def watch_active(self, name: str) -> None:
        for p in PANELS:
            self.query_one(f"#{p}-panel").set_class(p == name, "-active")
        tabs = "  ".join(
            f"[reverse b] {i} {PANEL_TITLES[p]} [/]" if p == name else f"[dim] {i} {PANEL_TITLES[p]} [/]"
            for i, p in enumerate(PANELS, 1)
        )
        self.query_one("#panel-tabs", Static).update(tabs + "   [dim]tab: next · ?: help[/]")
        target = {"swarm": PeersTable, "rollouts": RolloutsTable, "log": LogPanel}[name]
        self.query_one(target).focus()

    def action_cycle_panel(self, step: int) -> None:
        self.active = PANELS[(PANELS.index(self.active) + step) % len(PANELS)]

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(help_text(self.BINDINGS, self.app.get_key_display)))

    @on(DataTable.RowSelected, "#rollouts-table")
    def _open_rollout(self) -> None:
        browser = self.query_one(RolloutsBrowser)
        sample = browser.selected()
        if sample is not None:
            self.app.push_screen(RolloutScreen(sample, browser.peer_label(sample["peer"], sample["local"])))

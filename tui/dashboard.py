"""The dashboard: header, peers, rewards, training, rollouts and log, live from the watched node."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from p2pswarm import events as ev
from p2pswarm.events import Event

from tui.widgets import (HeaderBar, LogPanel, PeersTable, RewardPlot, RolloutsBrowser, RolloutsTable, TrainingPanel,
                         render_rollout)

PANELS = ("swarm", "rollouts", "log")
PANEL_TITLES = {"swarm": "swarm", "rollouts": "rollouts", "log": "log"}

HELP = """\
[b]p2pswarm dashboard[/]

[b]p[/]          pause / resume training (after the current round)
[b]q[/]          quit: finish the step, write a checkpoint, leave
           (q again while stopping: leave at once)
[b]1 2 3[/]      swarm · rollouts · log panel
[b]tab[/]        next panel ([b]shift+tab[/]: previous)
[b]↑ ↓ pgup pgdn[/]  move in the focused table or log
[b]enter[/]      on a rollout: the whole group
[b]?[/]          this help ([b]esc[/] closes)

[b]swarm[/]      peers (you first), reward per round, last update
[b]rollouts[/]   recent groups, yours and the swarm's, scored here
[b]log[/]        a line per round, and the node's log records

A terminal of 140×36 or more shows every panel at once.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark,enter", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(HELP, id="help-text")


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


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("q", "app.quit", "Quit"),
        Binding("ctrl+c", "app.quit", "Quit", show=False),
        Binding("tab", "cycle_panel(1)", "Panels", priority=True),
        Binding("shift+tab", "cycle_panel(-1)", "Prev panel", show=False, priority=True),
        Binding("1", "panel('swarm')", "Swarm", show=False),
        Binding("2", "panel('rollouts')", "Rollouts", show=False),
        Binding("3", "panel('log')", "Log", show=False),
        Binding("question_mark", "help", "Help"),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]

    def __init__(self, engine) -> None:
        super().__init__()
        self.engine = engine
        self.active = "swarm"
        self.round = -1
        self.stage = 0
        self.phase = "idle"
        self.finished = False
        self.ready = False  # mounted; until then engine messages wait in _pending (in order)
        self._pending: list[tuple] = []

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
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
        self.query_one("#plot").border_title = "rewards  " + RewardPlot.legend()
        self.query_one("#training").border_title = "training"
        self.query_one("#rollouts-panel").border_title = "rollouts"
        self.query_one("#log-panel").border_title = "log"
        header = self.query_one(HeaderBar)
        header.describe(self.engine)
        header.set_status("● running", "bold green")
        a = self.engine.agent
        if a is not None:
            self.query_one(RewardPlot).prefill(a.run_dir.read_metrics())
        self.query_one(RewardPlot).replot()
        self._show_panel("swarm")
        self.refresh_live()
        self.set_interval(1.0, self.refresh_live)
        self.ready = True
        for method, args in self._pending:
            method(*args)
        self._pending.clear()

    # ---- rendering from the engine ------------------------------------------------------------------
    def consume(self, e: Event) -> None:
        """One event of the watched node: every panel takes what it shows."""
        if not self.ready:
            self._pending.append((self.consume, (e,)))
            return
        header = self.query_one(HeaderBar)
        d = e.data
        if e.kind == ev.ROUND_STARTED:
            self.round, self.stage, self.phase = d["round"], 0, "generate"
            header.set_progress(0, 1)
        elif e.kind == ev.PROGRESS:
            self.round, self.stage = d["round"], d.get("stage", self.stage)
            self.phase = d["phase"]
            if d["phase"] == "generate" and d["done"] >= d["total"]:
                self.phase = "collect"
            header.set_progress(d["done"], d["total"])
        elif e.kind == ev.ROUND_FINISHED:
            self.round, self.phase = d["round"], "idle"
            header.set_progress(1, 1)
        elif e.kind == ev.PAUSED:
            if d["paused"]:
                header.set_status("❚❚ paused (p resumes)", "bold yellow")
            else:
                header.set_status("● running", "bold green")
        elif e.kind == ev.NODE_STOPPED:
            self.phase = "idle"
            header.set_status(f"■ stopped after round {d['round']}", "bold")
        elif e.kind == ev.ERROR:
            header.set_status("✖ error (see log)", "bold red")  # the message: in the log, and notified at the end
        if e.kind in (ev.ROUND_STARTED, ev.PROGRESS, ev.ROUND_FINISHED):
            stages = getattr(getattr(self.engine.agent, "data", None), "num_stages", 1)
            header.set_round(max(self.round, 0), self.stage, stages, self.phase)
        for widget in (self.query_one(PeersTable), self.query_one(RewardPlot), self.query_one(TrainingPanel),
                       self.query_one(RolloutsBrowser), self.query_one(LogPanel)):
            widget.consume(e)

    def log_line(self, text: str, level: int) -> None:
        if not self.ready:
            self._pending.append((self.log_line, (text, level)))
            return
        self.query_one(LogPanel).add_line(text, level)

    def refresh_live(self) -> None:
        """Live values the engine knows now: the peer list, last-seen times."""
        peers = self.query_one(PeersTable)
        peers.refresh_from(self.engine)
        self.query_one(RolloutsBrowser).names = peers.names

    def engine_finished(self, error: str | None) -> None:
        if not self.ready:
            self._pending.append((self.engine_finished, (error,)))
            return
        self.finished = True
        header = self.query_one(HeaderBar)
        if error:
            header.set_status("✖ stopped: error", "bold red")
            self.notify(error, title="the node stopped", severity="error", timeout=60, markup=False)
        elif not self.engine.stopping:
            header.set_status("■ finished (q quits)", "bold")

    def set_status(self, text: str, style: str) -> None:
        if not self.ready:
            self._pending.append((self.set_status, (text, style)))
            return
        self.query_one(HeaderBar).set_status(text, style)

    # ---- keys -----------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Keys act once the dashboard is mounted."""
        return self.ready or action not in ("toggle_pause", "panel", "cycle_panel")

    def action_toggle_pause(self) -> None:
        if self.finished or self.engine.stopping or self.engine.agent is None:
            return
        header = self.query_one(HeaderBar)
        if self.engine.paused:
            self.engine.resume()
            header.set_status("● running", "bold green")
        else:
            self.engine.pause()
            header.set_status("❚❚ pausing after this round…", "yellow")

    def action_panel(self, name: str) -> None:
        self._show_panel(name)

    def _show_panel(self, name: str) -> None:
        self.active = name
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
        self.action_panel(PANELS[(PANELS.index(self.active) + step) % len(PANELS)])

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    @on(DataTable.RowSelected, "#rollouts-table")
    def _open_rollout(self) -> None:
        browser = self.query_one(RolloutsBrowser)
        sample = browser.selected()
        if sample is not None:
            self.app.push_screen(RolloutScreen(sample, browser.peer_label(sample["peer"], sample["local"])))

"""The dashboard's panels. Each draws from the node's messages it declares handlers for (tui/engine.py)
and, for live values such as the peer list, from queries of the running engine (`refresh_from`).

Peers, the shared folder and the model choose most of the strings shown here: they are drawn as literal
text (tui/fmt.py: `literal`, `markup`; every table is a LiteralTable), never parsed as markup."""

from __future__ import annotations

import time
from collections import deque
from statistics import fmean
from typing import NamedTuple

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.reactive import reactive
from textual.widgets import DataTable, ProgressBar, RichLog, Static
from textual_plotext import PlotextPlot

from p2pswarm.events import span_text
from p2pswarm.headless import AVG_WINDOW, round_line
from p2pswarm.identity import friendly_name

from tui.engine import (CheckpointSaved, Evaluated, LogLine, NodeError, NodeEvent, NodeStarted, NodeStopped, Paused,
                        Resumed, RoundFinished, Rollouts, RolloutsReceived, RoundsSkipped)
from tui.fmt import ago, literal, markup, num, rate, short_id

PHASES = {"generate": "generating", "collect": "sharing rollouts", "train": "training", "idle": "between rounds"}


class Status(NamedTuple):
    """The node's state as the header shows it."""

    text: str
    style: str


RUNNING = Status("● running", "bold green")
PAUSING = Status("❚❚ pausing after this round…", "yellow")
PAUSED = Status("❚❚ paused (p resumes)", "bold yellow")
STOPPING = Status("■ stopping: finishing the step, writing a checkpoint…", "bold yellow")
STOPPING_NOW = Status("■ stopping: finishing the step, writing a checkpoint… (q again: now)", "bold yellow")
ERROR = Status("✖ error (see log)", "bold red")
STOPPED_BY_ERROR = Status("✖ stopped: error", "bold red")
FINISHED = Status("■ finished (q quits)", "bold")


REGISTRATION = {  # this node's claim on the chain, keyed by ChainStatus.registration
    "proven": ("✔ registered, proof ok", "green"),
    "unproven": ("registered without proof", "yellow"),
    "absent": ("✖ not registered", "bold red"),
    "": ("registration …", "dim"),
}


def chain_line(status) -> Text:
    """The header's chain line for a ChainStatus (None: not read yet): the chain's round, this node's
    registration, the contract's flavour and the node's chain address; a failure replaces the registration
    with its reason, after the last round read. Most telling first: a narrow terminal cuts the end."""
    t = Text().append("chain ", style="dim")  # a span: Text's own style would dim the whole line
    if status is None:
        return t.append("reading…", style="dim")
    if status.round >= 0:
        t.append("round ").append(str(status.round), style="bold")
        if status.stages > 1:
            t.append(f" · stage {status.stage + 1}/{status.stages}")
        t.append(" · ")
    if status.error:
        return t.append(literal(f"✖ {status.error}", style="bold red"))  # an RPC's words
    text, style = REGISTRATION.get(status.registration, (status.registration, ""))
    if status.registration == "unproven" and status.flavour != "p2pswarm":
        style = ""  # Gensyn's contract holds no proofs: nothing is wrong
    t.append(text, style=style)
    t.append(f" · {status.flavour} contract · key {status.eoa[:6]}…{status.eoa[-4:]}", style="dim")
    return t


class HeaderBar(Vertical):
    """Swarm, node, mode and model; the round and stage with a progress bar for the current phase, and the
    node's state; with a chain clock (settings.chain), a line for the chain's round and this node's
    registration. The dashboard binds the reactives below to its own."""

    round = reactive(-1)
    stage = reactive(0)
    phase = reactive("idle")
    progress = reactive((0.0, 1.0))
    status = reactive(Status("", ""))
    round_text = reactive("starting…")
    chain = reactive(None)  # the last ChainStatus read (None: not yet)

    def __init__(self, engine, **kw) -> None:
        super().__init__(**kw)
        self.engine = engine
        self.stages = getattr(getattr(engine.agent, "data", None), "num_stages", 1)
        self.has_chain = bool(engine.settings.chain)
        self.set_class(self.has_chain, "-chain")

    def compose(self) -> ComposeResult:
        engine, s, a = self.engine, self.engine.settings, self.engine.agent
        yield Static(markup("[b $accent]p2pswarm[/] · swarm [b]$experiment[/] [dim]($swarm)[/]"
                            " · mode [b]$mode[/] · model [b]$model[/]",
                            experiment=s.experiment, swarm=engine.swarm, mode=engine.mode, model=s.model),
                     id="hdr-swarm")
        if a is not None:
            here = f" · {len(engine.agents)} agents in this process" if len(engine.agents) > 1 else ""
            node = markup("node [b $accent]$name[/] · peer [b]$head…$tail[/]$here", name=a.name,
                          head=a.peer_id[:8], tail=a.peer_id[-6:], here=here)
        else:
            node = "node [dim]loading…[/]"
        yield Static(node, id="hdr-node")
        with Horizontal(id="hdr-progress"):
            yield Static("starting…", id="hdr-round")
            yield ProgressBar(total=1, show_eta=False, id="hdr-bar")
            yield Static("", id="hdr-status")
        if self.has_chain:
            yield Static(chain_line(None), id="hdr-chain")

    def compute_round_text(self) -> str | Content:
        if self.round < 0:
            return "starting…"
        stage = f" · stage {self.stage + 1}/{self.stages}" if self.stages > 1 else ""
        return markup("round [b]$round[/]$stage · $phase", round=self.round, stage=stage,
                      phase=PHASES.get(self.phase, self.phase))

    def watch_round_text(self, line: str | Content) -> None:
        self.query_one("#hdr-round", Static).update(line)

    def watch_progress(self, progress: tuple[float, float]) -> None:
        done, total = progress
        self.query_one("#hdr-bar", ProgressBar).update(total=max(total, 1), progress=done)

    def watch_status(self, status: Status) -> None:
        self.query_one("#hdr-status", Static).update(Text(status.text, style=status.style))

    def watch_chain(self, status) -> None:
        if self.has_chain:
            self.query_one("#hdr-chain", Static).update(chain_line(status))


class LiteralTable(DataTable):
    """A DataTable whose str cells are literal text. DataTable parses a str cell as markup when it draws it,
    and these cells hold peers' names, datasets and questions: `[/]` there would raise MarkupError while the
    screen is drawn, and end the app and its node. Every str cell is made a Text (fmt.literal) on its way in,
    whoever adds it."""

    def add_row(self, *cells, height: int | None = 1, key: str | None = None, label=None):
        return super().add_row(*(literal(c) if isinstance(c, str) else c for c in cells), height=height, key=key,
                               label=literal(label) if isinstance(label, str) else label)

    def update_cell(self, row_key, column_key, value, *, update_width: bool = False) -> None:
        super().update_cell(row_key, column_key, literal(value) if isinstance(value, str) else value,
                            update_width=update_width)

    def add_column(self, label, *, width: int | None = None, key: str | None = None, default=None):
        return super().add_column(label, width=width, key=key,
                                  default=literal(default) if isinstance(default, str) else default)


class PeersTable(LiteralTable):
    """This node first, then every peer the transport knows: name, short id, mode, round, last seen,
    mean reward (of their rollouts, as this node scored them) and rollouts shared/received."""

    COLUMNS = (("name", "name"), ("peer", "peer"), ("mode", "mode"), ("round", "round"), ("seen", "seen"),
               ("reward", "reward"), ("rollouts", "shared/recv"))

    def __init__(self, **kw) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self._reward: dict[str, float] = {}  # last per-peer mean reward from rollouts_received
        self._self_reward: float | None = None
        self._shared = self._received = 0

    def on_mount(self) -> None:
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    def on_rollouts_received(self, message: RolloutsReceived) -> None:
        self._reward.update(message.peer_rewards)

    def on_rollouts(self, message: Rollouts) -> None:
        self._shared += message.local_groups
        self._received += message.swarm_groups

    def on_round_finished(self, message: RoundFinished) -> None:
        self._self_reward = message.metrics.get("reward_local_mean")

    def refresh_from(self, engine) -> None:
        a = engine.agent
        if a is None:
            return
        now = time.time()
        rows = [(a.peer_id, literal(a.name, style="bold"), short_id(a.peer_id), engine.mode, str(max(a.round, 0)),
                 "you", num(self._self_reward), f"{self._shared}/{self._received}")]
        for p in sorted(a.comm.peers(), key=lambda p: p.name or p.peer_id):
            name = p.name or friendly_name(p.peer_id)
            # A peer this node ignores for now (it sent invalid data) is marked, with the reason.
            label = literal(f"{name} ⊘ {p.ignored}", style="red") if p.ignored else literal(name)
            rows.append((p.peer_id, label, short_id(p.peer_id),
                         literal(getattr(p, "mode", engine.mode)), str(p.round) if p.round >= 0 else "–",
                         ago(p.last_seen, now), num(self._reward.get(p.peer_id)), f"{p.rollouts_received}/–"))
        keys = [r[0] for r in rows]
        existing = [k.value for k in self.rows]
        if existing != keys:
            cursor = self.cursor_row
            self.clear()
            for key, *cells in rows:
                self.add_row(*cells, key=key)
            if self.row_count:
                self.move_cursor(row=min(cursor, self.row_count - 1))
        else:
            for key, *cells in rows:
                for (col, _), value in zip(self.COLUMNS, cells):
                    self.update_cell(key, col, value)

    @property
    def names(self) -> dict[str, str]:
        return {k.value: str(self.get_cell(k, "name")) for k in self.rows}


class RewardPlot(PlotextPlot):
    """Reward per round: this node's own rollouts (each round, faint, and their trailing mean over AVG_WINDOW
    rounds, bold: one round's reward is a handful of samples, the mean shows the trend), the swarm's (as this
    node scored them), the best peer, and the held-out greedy accuracy at each evaluation (every eval_every
    rounds)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._mine: dict[int, float] = {}
        self._swarm: dict[int, float] = {}
        self._best: dict[int, float] = {}
        self._eval: dict[int, float] = {}

    @property
    def points(self) -> int:
        return len(self._mine)

    @property
    def eval_points(self) -> int:
        return len(self._eval)

    def prefill(self, rows: list[dict]) -> None:
        """Earlier rounds of this node (metrics.jsonl), so a resumed node shows its history."""
        for m in rows:
            self._add_round(m)
        self.replot()

    def _add_round(self, m: dict) -> None:
        r = m.get("round")
        if r is None:
            return
        if m.get("reward_local_mean") is not None:
            self._mine[r] = m["reward_local_mean"]
        if m.get("reward_swarm_mean") is not None:
            self._swarm[r] = m["reward_swarm_mean"]
        if m.get("eval_reward") is not None:
            self._eval[r] = m["eval_reward"]

    def on_round_finished(self, message: RoundFinished) -> None:
        self._add_round(message.metrics)
        self.replot()

    def on_rollouts_received(self, message: RolloutsReceived) -> None:
        if message.peer_rewards:
            r, best = message.round, max(message.peer_rewards.values())
            self._best[r] = max(best, self._best.get(r, best))

    def trend(self) -> dict[int, float]:
        """This node's reward averaged over the AVG_WINDOW rounds up to each round (fewer at the start)."""
        xs = sorted(self._mine)
        out: dict[int, float] = {}
        for i, x in enumerate(xs):
            window = [self._mine[x2] for x2 in xs[max(0, i - AVG_WINDOW + 1) : i + 1] if x2 > x - AVG_WINDOW]
            out[x] = fmean(window)
        return out

    SERIES = (("this node", "#1f5f7a"), (f"avg{AVG_WINDOW}", "#33c3f0"), ("swarm", "#ff9f1c"),
              ("best peer", "#7bd389"), ("held-out", "#e86fd0"))

    @classmethod
    def legend(cls, start: int = 0, stop: int | None = None) -> str:
        """Markup for the panel's border: the series (SERIES[start:stop]) and their colours."""
        return "  ".join(f"[{color}]━[/] {label}" for label, color in cls.SERIES[start:stop])

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        top = 1.0
        # the faint per-round line first, so that the others are drawn over it
        for data, (label, color) in zip((self._mine, self.trend(), self._swarm, self._best, self._eval), self.SERIES):
            xs = sorted(data)
            if xs:
                ys = [data[x] for x in xs]
                top = max(top, *ys)
                plt.plot(xs, ys, color=tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)), marker="braille")
        plt.ylim(0, top)
        rounds = sorted(set(self._mine) | set(self._swarm) | set(self._best) | set(self._eval))
        if rounds:
            lo, hi = rounds[0], max(rounds[-1], rounds[0] + 1)
            plt.xlim(lo, hi)
            step = max(1, -(-(hi - lo) // 5))
            ticks = list(range(lo, hi + 1, step))
            plt.xticks(ticks, [str(t) for t in ticks])
        plt.yticks([0, 0.25, 0.5, 0.75, 1.0], ["0", ".25", ".5", ".75", "1"])
        plt.xlabel("round")
        self.refresh()


class TrainingPanel(Static):
    """The last round's update: loss, KL, tokens/s, round time, and what it trained on."""

    def __init__(self, **kw) -> None:
        super().__init__("waiting for the first round…", **kw)
        self._m: dict = {}
        self._checkpoint: int | None = None
        self._eval: float | None = None

    def on_round_finished(self, message: RoundFinished) -> None:
        self._m = message.metrics
        if "eval_reward" in self._m:
            self._eval = self._m["eval_reward"]
        self._redraw()

    def on_checkpoint_saved(self, message: CheckpointSaved) -> None:
        self._checkpoint = message.round
        self._redraw()

    def on_resumed(self, message: Resumed) -> None:
        self._checkpoint = message.round
        self._redraw()

    def _redraw(self) -> None:
        m = self._m
        rows = []
        if m:
            comm = m.get("comm") or {}
            rows = [
                ("loss", num(m.get("loss"), "+.4f")),
                ("KL", num(m.get("kl"), ".4f")),
                ("tokens/s", rate(m.get("gen_tokens_per_s"))),
                ("round time", f"{m.get('round_seconds', 0):.2f} s"),
                ("groups I+J", f"{m.get('local_groups', 0)}+{m.get('swarm_groups', 0)}"),
                ("swarm peers", f"{m.get('swarm_peers', 0)}"),
                ("signal", num(m.get("signal_fraction"), ".0%")),
                ("clipped", num(m.get("clip_fraction"), ".1%")),
                ("dropped", f"{sum(v for k, v in comm.items() if k.startswith('dropped_'))}"),
            ]
        if self._eval is not None:
            rows.append(("eval", num(self._eval)))
        rows.append(("checkpoint", "–" if self._checkpoint is None else f"round {self._checkpoint}"))
        self.border_title = f"training · round {m['round']}" if m else "training"
        text = Text()
        for i, (k, v) in enumerate(rows):
            text.append(f"{k:<12}", style="dim")
            text.append(v, style="bold")
            if i < len(rows) - 1:
                text.append("\n")
        self.update(text)


class RolloutsTable(LiteralTable):
    pass


class RolloutsBrowser(Vertical):
    """Recent rollout groups, local and from the swarm; the highlighted one in full below (or beside)."""

    KEEP = 64

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._samples: deque[dict] = deque(maxlen=self.KEEP)
        self._seq = 0
        self.names: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield RolloutsTable(cursor_type="row", zebra_stripes=True, id="rollouts-table")
        with VerticalScroll(id="rollout-detail-box"):
            yield Static("no rollouts yet: they appear once this node has generated a stage", id="rollout-detail")

    def on_mount(self) -> None:
        table = self.query_one(RolloutsTable)
        for key, label in (("round", "rd"), ("from", "from"), ("dataset", "dataset"), ("reward", "reward"),
                           ("question", "question")):
            table.add_column(label, key=key)

    def peer_label(self, peer: str, local: bool) -> str:
        return "you" if local else self.names.get(peer) or friendly_name(peer)

    def on_rollouts(self, message: Rollouts) -> None:
        table = self.query_one(RolloutsTable)
        follow = table.row_count == 0 or table.cursor_row >= table.row_count - 1  # on the newest: keep following
        for s in message.samples:
            self._seq += 1
            key = str(self._seq)
            s = {**s, "round": message.round, "stage": message.stage, "key": key}
            if len(self._samples) == self.KEEP:
                old = self._samples.popleft()
                if old["key"] in [k.value for k in table.rows]:
                    table.remove_row(old["key"])
            self._samples.append(s)
            mean = fmean(s["rewards"]) if s["rewards"] else None
            question = " ".join(s["question"].split())
            table.add_row(str(s["round"]), literal(self.peer_label(s["peer"], s["local"])), literal(s["dataset"]),
                          num(mean, ".2f"), literal(question[:60]), key=key)
        if follow and table.row_count:
            table.move_cursor(row=table.row_count - 1)
            self.show(self._samples[-1])

    def on_data_table_row_highlighted(self, message: DataTable.RowHighlighted) -> None:
        key = message.row_key.value
        for s in self._samples:
            if s["key"] == key:
                self.show(s)
                break

    def selected(self) -> dict | None:
        table = self.query_one(RolloutsTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        return next((s for s in self._samples if s["key"] == key), None)

    def show(self, s: dict) -> None:
        self.query_one("#rollout-detail", Static).update(render_rollout(s, self.peer_label(s["peer"], s["local"])))


def render_rollout(s: dict, who: str) -> Text:
    """A group in full. Its texts come from the model, the dataset and (swarm groups) another peer: literal."""
    t = Text()
    src = "local" if s["local"] else "swarm"
    t.append(literal(f"round {s['round']} stage {s['stage']} · {src} · from {who} · {s['dataset']}\n", style="bold"))
    t.append("question ", style="dim")
    t.append(literal(s["question"].strip() + "\n"))
    t.append("answer   ", style="dim")
    t.append(literal(s["answer"] + "\n", style="bold green"))
    for i, (c, r) in enumerate(zip(s["completions"], s["rewards"] or [None] * len(s["completions"]))):
        style = "green" if r and r >= 0.999 else ("yellow" if r and r > 0 else "red")
        t.append(f"#{i + 1} ", style="dim")
        t.append(f"[{num(r, '.2f')}] ", style=f"bold {style}")
        t.append(literal(" ".join(c.split()) + "\n"))
    return t


class LogPanel(RichLog):
    """The node's log: one line per round (as the headless console prints it) and the engine's log records.
    Lines are kept (bounded) and re-wrapped when the panel changes width."""

    KEEP = 2000

    def __init__(self, **kw) -> None:
        super().__init__(max_lines=self.KEEP, min_width=20, wrap=True, markup=False, highlight=False,
                         auto_scroll=True, **kw)
        self._kept: deque[Text] = deque(maxlen=self.KEEP)
        self._width = 0

    @property
    def texts(self) -> list[str]:
        """The plain text of the kept lines (drawn or not: a hidden panel draws once shown)."""
        return [t.plain for t in self._kept]

    def _add(self, text: Text) -> None:
        self._kept.append(text)
        self.write(text)

    def on_resize(self, event) -> None:
        if event.size.width != self._width:
            self._width = event.size.width
            self.clear()
            for line in self._kept:
                self.write(line)

    def _event_line(self, message: NodeEvent, line: str, style: str = "") -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(message.at))
        self._add(literal(f"{stamp} {line}", style=style))

    def on_round_finished(self, message: RoundFinished) -> None:
        self._event_line(message, round_line(message.metrics))

    def on_node_started(self, message: NodeStarted) -> None:
        self._event_line(message, f"node {message.name} (peer {message.peer}) starting at round {message.first_round}"
                                  f" with model {message.model}")

    def on_resumed(self, message: Resumed) -> None:
        self._event_line(message, f"resumed from {message.checkpoint}")

    def on_rounds_skipped(self, message: RoundsSkipped) -> None:
        self._event_line(message, f"skipped round(s) {span_text(message.first, message.last)} to follow the swarm")

    def on_checkpoint_saved(self, message: CheckpointSaved) -> None:
        self._event_line(message, f"checkpoint {message.path}")

    def on_paused(self, message: Paused) -> None:
        self._event_line(message, "paused" if message.paused else "resumed training")

    def on_evaluated(self, message: Evaluated) -> None:
        scores = " ".join(f"{k}={v:.3f}" for k, v in message.scores.items() if isinstance(v, float))
        self._event_line(message, f"eval {scores}")

    def on_node_stopped(self, message: NodeStopped) -> None:
        self._event_line(message, f"stopped after round {message.round}" + ("" if message.clean else " (interrupted)"))

    def on_node_error(self, message: NodeError) -> None:
        self._event_line(message, f"ERROR {message.message}", style="bold red")

    def on_log_line(self, message: LogLine) -> None:
        style = "bold red" if message.level >= 40 else ("yellow" if message.level >= 30 else "")
        self._add(literal(message.text, style=style))

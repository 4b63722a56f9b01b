"""The join screen: which swarm, which mode, experiment, node id, model, I/J. Every field has a working
default, so Enter starts a node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Select, Static

from p2pswarm.errors import UserError
from p2pswarm.identity import Identity
from p2pswarm.settings import Settings, SettingsError

from tui.engine import Engine
from tui.fmt import literal, markup

SettingsFactory = Callable[..., Settings]


class JoinError(UserError, ValueError):
    """The form asks for something this build cannot do; the message says what to do instead."""


# Join modes: `comm` is the transport (Settings.comm) the mode runs, and `field` the setting that takes the
# swarm field's text (bootstrap addresses, or the shared folder).
MODES: dict[str, dict[str, Any]] = {
    "auto": {"label": "auto (from the swarm field)"},
    "local": {"label": "local: a swarm in this process", "comm": "inprocess"},
    "dht": {"label": "DHT (hivemind)", "comm": "hivemind", "field": "initial_peers"},
    "drive": {"label": "Drive folder", "comm": "drive", "field": "drive_path"},
}


def mode_of(settings: Settings) -> str:
    """The mode that settings made without the form run (the demo, `p2pswarm run` on a terminal): the
    form's name for their transport, or the transport's own (auto, hybrid)."""
    return next((m for m, spec in MODES.items() if spec.get("comm") == settings.comm), settings.comm)


def swarm_of(settings: Settings) -> str:
    """The swarm field's text for settings made without the form."""
    if settings.comm in ("hivemind", "auto", "hybrid") and settings.initial_peers:
        return " ".join(settings.initial_peers)
    if settings.comm in ("drive", "auto", "hybrid") and settings.drive_path:
        return str(settings.drive_path)
    return ""


def looks_like_multiaddr(text: str) -> bool:
    return text.startswith(("/ip4/", "/ip6/", "/dns", "/p2p/"))


def resolve_mode(mode: str, swarm: str) -> str:
    """The concrete mode (local, dht, drive) for the form's mode and swarm field, or JoinError."""
    swarm = swarm.strip()
    if mode == "auto":
        mode = "local" if not swarm else ("dht" if looks_like_multiaddr(swarm) else "drive")
    if mode == "local" and swarm:
        raise JoinError("local mode starts a new swarm in this process: clear the swarm field, "
                        "or choose DHT or Drive to join an existing swarm")
    if mode == "drive" and not swarm:
        raise JoinError("Drive mode needs the shared folder in the swarm field")
    return mode  # DHT with an empty swarm field starts a new swarm that others can join


def default_node_name(settings: Settings, create: bool) -> str | None:
    """The friendly name of the identity this node will use (creating the key if `create`)."""
    from p2pswarm.node import identity_path

    path = identity_path(settings, 0)
    try:
        if path.exists() or create:
            return Identity.load_or_create(path).name
    except (OSError, ValueError):
        return None
    return None


class FormRow(Horizontal):
    pass


class JoinScreen(Screen):
    """Fill in (or accept) the fields and press Enter: the node starts and the dashboard opens."""

    BINDINGS = [
        Binding("ctrl+s", "start", "Start", show=True, priority=True),
        Binding("escape", "app.quit", "Quit", show=True),
        Binding("ctrl+q", "app.quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, factory: SettingsFactory, *, autostart: bool = False, rounds: int | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.autostart = autostart
        self.rounds = rounds
        self.base = factory()
        # Started at once (the demo, `run` on a terminal), the node runs the factory's settings as they are;
        # the form shows them where it can, so that a second try after a failure starts the same kind of node.
        mode = mode_of(self.base)
        self.mode, self.swarm = (mode, swarm_of(self.base)) if autostart and mode in MODES else ("auto", "")
        self.starting = False
        self._creating_identity = False  # the first lookup creates the identity file: Start waits for it
        self._start_pending = False

    def compose(self) -> ComposeResult:
        s = self.base
        with Vertical(id="join-box"):
            yield Static("[b]p2pswarm[/] · join a swarm and watch it learn", id="join-title")
            with Grid(id="join-form"):
                yield Label("Swarm", classes="field-label")
                yield Input(self.swarm, id="swarm", compact=True,
                            placeholder="empty: start a new local swarm · multiaddrs (DHT) · folder (Drive)")
                yield Label("Mode", classes="field-label")
                yield Select([(spec["label"], m) for m, spec in MODES.items()], value=self.mode, allow_blank=False,
                             id="mode", compact=True)
                yield Label("", classes="field-label")
                yield Static("", id="mode-hint")
                yield Label("Experiment", classes="field-label")
                yield Input(s.experiment, placeholder="default", id="experiment", compact=True)
                yield Label("Node id", classes="field-label")
                yield Input(s.node_id or "", placeholder="default: a friendly name from your peer id", id="node_id",
                            compact=True)
                yield Label("Model", classes="field-label")
                yield Input(s.model, placeholder="embedded, a local folder, or a hub name", id="model", compact=True)
                yield Label("I / J groups", classes="field-label")
                with Horizontal(id="ij"):
                    yield Input(str(s.local_groups), type="integer", id="local_groups", compact=True)
                    yield Label(" local  ", classes="ij-label")
                    yield Input(str(s.swarm_groups), type="integer", id="swarm_groups", compact=True)
                    yield Label(" swarm", classes="ij-label")
                yield Label("Local agents", classes="field-label")
                yield Input(str(s.agents), type="integer", id="agents", compact=True)
            yield Static("", id="join-status")
            with Horizontal(id="join-buttons"):
                yield Button("Start", variant="primary", id="start", compact=True)
                yield Button("Quit", id="quit", compact=True)
            yield Static("[dim]Enter starts with these values · Tab moves between fields · Esc quits[/]",
                         id="join-help")
        yield Footer()

    def on_mount(self) -> None:
        self._update_hint()
        self.query_one("#swarm", Input).focus()
        if self.autostart:
            self._start(self.base, mode_of(self.base), swarm_of(self.base))
        else:
            self._update_node_placeholder(create=True)

    # ---- field feedback -----------------------------------------------------------------------------
    def _field(self, id: str) -> str:
        return self.query_one(f"#{id}", Input).value.strip()

    def _update_hint(self) -> None:
        mode = self.query_one("#mode", Select).value
        swarm = self._field("swarm")
        try:
            concrete = resolve_mode(str(mode), swarm)
            agents = self._field("agents") or "1"
            hint = {"local": f"a new swarm of {agents} agent(s) in this process",
                    "dht": "joins through the bootstrap peers" if swarm else
                           "starts a new swarm others can join (the log shows its address)",
                    "drive": "joins through the shared folder"}[concrete]
            if mode == "auto":
                hint = f"→ {concrete}: {hint}"
            self.query_one("#mode-hint", Static).update(markup("[dim]$hint[/]", hint=hint))
        except JoinError as e:
            self.query_one("#mode-hint", Static).update(markup("[$warning]$why[/]", why=e))

    def _update_node_placeholder(self, create: bool = False) -> None:
        try:
            s = self.factory(**self._overrides(node_id=False))
        except (SettingsError, JoinError, ValueError):
            return
        if self.starting:
            return
        self._creating_identity = self._creating_identity or create
        self._find_node_name(s, create)

    @work(thread=True, exclusive=True, group="node-name", exit_on_error=False)
    def _find_node_name(self, settings: Settings, create: bool) -> None:
        """Off the UI thread: the first call imports the engine (torch, transformers), which takes seconds."""
        name = None
        try:
            name = default_node_name(settings, create)
        finally:
            self.app.call_from_thread(self._node_name_found, name, create)

    def _node_name_found(self, name: str | None, created: bool) -> None:
        if created:
            self._creating_identity = False
        if not self.is_attached:
            return
        self.query_one("#node_id", Input).placeholder = (
            f"default: {name} (from your peer id)" if name else "default: a friendly name from a new peer id")
        if self._start_pending and not self._creating_identity:
            self._start_pending = False
            self.action_start()

    @on(Select.Changed, "#mode")
    def _mode_changed(self) -> None:
        self._update_hint()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "swarm":
            self._update_hint()
        elif event.input.id in ("experiment", "agents"):
            self._update_node_placeholder()
            self._update_hint()

    # ---- start ------------------------------------------------------------------------------------
    def _overrides(self, node_id: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("experiment", "model", "local_groups", "swarm_groups", "agents") + (("node_id",) if node_id else ()):
            value = self._field(key)
            if value:
                out[key] = value
        return out

    def settings(self) -> tuple[Settings, str, str]:
        """(settings, mode, swarm field) from the form; JoinError or SettingsError if it can't start."""
        swarm = self._field("swarm")
        mode = resolve_mode(str(self.query_one("#mode", Select).value), swarm)
        overrides = self._overrides()
        spec = MODES[mode]
        if "comm" in spec:
            overrides["comm"] = spec["comm"]
        if "field" in spec:
            overrides[spec["field"]] = swarm.split() if spec["field"] == "initial_peers" else swarm
        return self.factory(**overrides), mode, swarm

    @on(Input.Submitted)
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.starting:
            return
        if self._creating_identity:  # the engine would create the same identity file: let that finish first
            self._start_pending = True
            self.set_status("preparing this node's identity…", "")
            return
        try:
            settings, mode, swarm = self.settings()
        except (JoinError, SettingsError) as e:
            self.failed(str(e))
            return
        self._start(settings, mode, swarm)

    def _start(self, settings: Settings, mode: str, swarm: str) -> None:
        self.starting = True
        self.set_status(f"starting {settings.agents} agent(s): loading model {settings.model}…", "")
        for w in self.query("Input, Select, #start"):
            w.disabled = True
        self.app.start_engine(Engine(settings, rounds=self.rounds, mode=mode, swarm=swarm or "new local swarm"))

    @on(Button.Pressed, "#quit")
    def _quit(self) -> None:
        self.app.exit()

    def failed(self, reason: str) -> None:
        """The node could not start: say why, and let the user fix the form."""
        self.starting = False
        for w in self.query("Input, Select, #start"):
            w.disabled = False
        self.set_status(f"✖ {reason}", "error")
        self.query_one("#swarm", Input).focus()

    def set_status(self, text: str, cls: str) -> None:
        status = self.query_one("#join-status", Static)
        status.set_class(cls == "error", "error")
        status.update(literal(text))  # a reason may quote a path, a model or a peer's words

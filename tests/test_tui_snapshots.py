"""Snapshots of the terminal UI (pytest-textual-snapshot): the dashboard at 80×24 and 140×42, its help,
and the join screen. The dashboard draws a fixed sequence of the node's events, posted as the engine posts
them, with no training, clock or random peer id in the picture, so a snapshot changes only when the UI does.

After a deliberate change of the layout: `pytest tests/test_tui_snapshots.py --snapshot-update`, then look
at the SVGs under tests/__snapshots__/ before committing them."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from textual.app import App
from textual.widgets import Input

import tui
from p2pswarm import events as ev
from p2pswarm.comm.chain.coordinator import PROVEN, ChainStatus
from p2pswarm.components import PeerInfo
from p2pswarm.events import Event
from p2pswarm.identity import Identity, friendly_name
from p2pswarm.settings import load_settings
from tui import SwarmApp
from tui.dashboard import DashboardScreen
from tui.engine import ChainState, LogLine, node_message
from tui.widgets import LogPanel, RewardPlot, RolloutsTable

T0 = 1_700_000_000.0  # when the first event happened: the log's stamps, in UTC
ROUNDS = 5  # rounds played before the picture; the next one is generating


def peer_id(n: int) -> str:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)).peer_id


ME, ANN, BOB = peer_id(1), peer_id(2), peer_id(3)
CHAIN = ChainStatus(flavour="p2pswarm", eoa="0x" + "ab12" * 10, round=ROUNDS + 2, registration=PROVEN)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ---- a node that is not there: what the dashboard queries of the engine -------------------------------
class FakeComm:
    def peers(self) -> list[PeerInfo]:
        seen = time.time() - 4  # "4s" ago whenever the table asks
        return [PeerInfo(p, friendly_name(p), ROUNDS, seen, 10 + i) for i, p in enumerate((ANN, BOB))]


class FakeEngine:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.mode, self.swarm = "dht", "new local swarm"
        self.agent = SimpleNamespace(name=friendly_name(ME), peer_id=ME, round=ROUNDS, comm=FakeComm(),
                                     data=SimpleNamespace(num_stages=1),
                                     run_dir=SimpleNamespace(read_metrics=lambda: []))
        self.agents = [self.agent, object(), object()]
        self.stopping = self.paused = False


def metrics(r: int) -> dict:
    local, swarm = 0.30 + 0.08 * r, 0.40 + 0.05 * r
    return {"round": r, "reward_mean": (local + 2 * swarm) / 3, "reward_local_mean": local, "reward_swarm_mean": swarm,
            "loss": -0.004 + 0.001 * r, "kl": 0.0, "gen_tokens_per_s": 350.0 + 10 * r, "round_seconds": 1.8,
            "local_groups": 4, "swarm_groups": 4, "swarm_peers": 2, "swarm_groups_received": 8,
            "signal_fraction": 0.75, "clip_fraction": 0.012, "comm": {"dropped_bad_signature": 0},
            **({"eval_reward": 0.25 + 0.06 * r} if r % 2 else {})}  # held-out every 2 rounds


def sample(r: int, peer: str, n: int) -> dict:
    a, b = 3 + r + n, 4 + n
    return {"peer": peer, "local": peer == ME, "task_id": f"{r}:{n}", "dataset": "basic_arithmetic",
            "question": f"Calculate {a} + {b}.", "answer": str(a + b),
            "completions": [f"<answer>{a + b}</answer>", f"<answer>{a + b + 1}</answer>"], "rewards": [1.0, 0.0]}


def node_events() -> list[Event]:
    """Rounds 0..ROUNDS-1 with two peers, a checkpoint, then the next round a third of the way generated."""
    out: list[Event] = []

    def emit(kind: str, **data) -> None:
        out.append(Event(kind, ME, data, time=T0 + 1.5 * len(out)))

    emit(ev.NODE_STARTED, name=friendly_name(ME), first_round=0, model="embedded")
    for r in range(ROUNDS):
        emit(ev.ROUND_STARTED, round=r)
        emit(ev.PROGRESS, round=r, stage=0, phase="generate", done=8, total=8)
        emit(ev.ROLLOUTS_RECEIVED, round=r, stage=0, groups=8, peers=[ANN, BOB],
             peer_rewards={ANN: 0.35 + 0.1 * r, BOB: 0.5 + 0.05 * r})
        emit(ev.ROLLOUTS, round=r, stage=0, local_groups=4, swarm_groups=8,
             samples=[sample(r, ME, 0), sample(r, ANN, 1), sample(r, BOB, 2)])
        emit(ev.PROGRESS, round=r, stage=0, phase="train", done=4, total=4)
        emit(ev.ROUND_FINISHED, **metrics(r))
        if r == 3:
            emit(ev.CHECKPOINT_SAVED, round=r, path="runs/demo/node/checkpoints/round_3")
    emit(ev.ROUND_STARTED, round=ROUNDS)
    emit(ev.PROGRESS, round=ROUNDS, stage=0, phase="generate", done=3, total=8)
    return out


class DashboardReplay(App):
    """The dashboard of the fake engine, fed the events as SwarmApp feeds it: messages posted to the screen
    as soon as it is pushed, which Textual hands over once it is mounted."""

    CSS_PATH = str(Path(tui.__file__).parent / "swarm.tcss")
    TITLE = SwarmApp.TITLE
    ENABLE_COMMAND_PALETTE = SwarmApp.ENABLE_COMMAND_PALETTE

    def __init__(self, settings) -> None:
        super().__init__()
        self.engine = FakeEngine(settings)

    def on_mount(self) -> None:
        dashboard = DashboardScreen(self.engine)
        self.push_screen(dashboard)
        dashboard.post_message(LogLine("00:00:00 loading embedded for 3 agent(s)"))
        for e in node_events():
            dashboard.post_message(node_message(e))
        if self.engine.settings.chain:  # a reading of the chain clock, as the engine's chain thread posts it
            dashboard.post_message(ChainState(CHAIN))


async def every_event_drawn(pilot) -> None:
    dash, deadline = pilot.app.screen, time.monotonic() + 60
    while time.monotonic() < deadline:
        if (dash.is_mounted and dash.progress == (3, 8) and dash.query_one(RewardPlot).points == ROUNDS
                and dash.query_one(RolloutsTable).row_count == 3 * ROUNDS
                and len(dash.query_one(LogPanel).texts) == 2 + ROUNDS + 1):
            break
        await pilot.pause(0.05)
    else:
        raise AssertionError("the dashboard did not draw every event")
    dash.refresh_live()  # what the once-a-second refresh shows: the peers' rewards and rollout counts
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (140, 42)], ids=["80x24", "140x42"])
def test_dashboard(snap_compare, tmp_path, size):
    app = DashboardReplay(load_settings(runs_dir=tmp_path, experiment="demo"))
    assert snap_compare(app, terminal_size=size, run_before=every_event_drawn)


def test_dashboard_with_a_chain_clock(snap_compare, tmp_path):
    app = DashboardReplay(load_settings(runs_dir=tmp_path, experiment="demo", chain="local"))

    async def chain_drawn(pilot) -> None:
        await every_event_drawn(pilot)
        deadline = time.monotonic() + 60
        while pilot.app.screen.chain != CHAIN:
            assert time.monotonic() < deadline, "the chain's reading was not drawn"
            await pilot.pause(0.05)

    assert snap_compare(app, terminal_size=(80, 24), run_before=chain_drawn)


def test_dashboard_help(snap_compare, tmp_path):
    app = DashboardReplay(load_settings(runs_dir=tmp_path, experiment="demo"))

    async def open_help(pilot) -> None:
        await every_event_drawn(pilot)
        await pilot.press("question_mark")

    assert snap_compare(app, terminal_size=(80, 24), run_before=open_help)


def test_join_screen(snap_compare, tmp_path):
    from p2pswarm.node import identity_path

    def factory(**overrides):
        return load_settings(**{"runs_dir": tmp_path / "runs", **overrides})

    path = identity_path(factory(), 0)  # a fixed key: the node id's placeholder names it
    path.parent.mkdir(parents=True)
    path.write_bytes(Identity(Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)).to_bytes())

    async def named(pilot) -> None:
        node = pilot.app.screen.query_one("#node_id", Input)
        deadline = time.monotonic() + 300  # the lookup imports the engine (torch): minutes on a loaded machine
        while "(from your peer id)" not in node.placeholder and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert friendly_name(ME) in node.placeholder, node.placeholder
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False  # the cursor shown, whenever the picture is taken

    assert snap_compare(SwarmApp(factory), terminal_size=(80, 24), run_before=named)

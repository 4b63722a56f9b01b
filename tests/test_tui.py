"""The terminal UI against a real in-process swarm of the embedded policy, driven by Textual's pilot."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from p2pswarm.settings import load_settings
from tui import SwarmApp
from tui.dashboard import DashboardScreen, HelpScreen, RolloutScreen
from tui.join import JoinScreen
from tui.widgets import HeaderBar, LogPanel, PeersTable, RewardPlot, RolloutsBrowser, RolloutsTable, TrainingPanel

# Seconds: the bound on any one wait. Every wait is on a condition, so it costs nothing on an idle machine,
# where a round takes about a second on 2 cores; on a loaded one a round can take half a minute, and loading
# a model or starting a process minutes.
WAIT = 300.0


def factory(tmp_path: Path, **base):
    def make(**overrides):
        return load_settings(**{"runs_dir": tmp_path / "runs", "eval_every": 0, "collect_timeout": 30, **base,
                                **overrides})

    return make


async def until(pilot, cond, what: str, timeout: float = WAIT, detail=lambda: "") -> None:
    """Wait for cond(); `detail()` says what the UI shows instead, when it times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")


async def dashboard_opens(pilot, app: SwarmApp) -> None:
    """Until the node is built and its dashboard mounted; at once, with the reason, if the node cannot start."""
    status = app.screen.query_one("#join-status") if isinstance(app.screen, JoinScreen) else None

    def opened() -> bool:
        if status is not None:
            assert "✖" not in text_of(status), text_of(status)  # the join screen says why: no use waiting
        return isinstance(app.screen, DashboardScreen) and app.screen.is_mounted

    await until(pilot, opened, "the dashboard", detail=lambda: f"join screen: {text_of(status) if status else '?'}")


@asynccontextmanager
async def running(app: SwarmApp, size: tuple[int, int]):
    """The app under the pilot; whatever happens, its engine is stopped and joined afterwards."""
    try:
        async with app.run_test(size=size) as pilot:
            yield pilot
    finally:
        if app.engine is not None:
            app.engine.stop()
            assert app.engine.join(60), "the engine thread did not stop"


def text_of(widget) -> str:
    """The plain text a Static shows (markup resolved)."""
    content = widget.content
    if hasattr(content, "plain"):
        return content.plain
    return getattr(widget.visual, "plain", str(content))


def metrics(app: SwarmApp) -> list[dict]:
    return app.engine.agent.run_dir.read_metrics()


def visible(widget, size: tuple[int, int]) -> bool:
    r = widget.region
    return r.width > 0 and r.height > 0 and r.right <= size[0] and r.bottom <= size[1]


@pytest.mark.timeout(900)
def test_enter_with_defaults_starts_a_node_and_the_dashboard_follows_it_at_80x24(tmp_path):
    size = (80, 24)
    app = SwarmApp(factory(tmp_path, agents=2))

    async def scenario():
        async with running(app, size) as pilot:
            join = app.screen
            assert isinstance(join, JoinScreen)
            await until(pilot, lambda: "(from your peer id)" in join.query_one("#node_id").placeholder,
                        "the node id's default (the friendly name)")
            await pilot.press("enter")  # every field has a default
            await dashboard_opens(pilot, app)
            dash = app.screen
            agent = app.engine.agent
            peers = dash.query_one(PeersTable)

            # the peers table fills: this node first, then the other agent
            await until(pilot, lambda: peers.row_count == 2, "both peers in the table")
            assert str(peers.get_row_at(0)[0]) == agent.name
            # the round advances and the plot gets points
            plot = dash.query_one(RewardPlot)
            await until(pilot, lambda: plot.points >= 2, "two rounds on the reward plot")
            header = dash.query_one(HeaderBar)
            assert agent.name in text_of(header.query_one("#hdr-node"))
            assert "mode local" in text_of(header.query_one("#hdr-swarm"))  # Enter with an empty swarm field
            assert "round" in text_of(header.query_one("#hdr-round"))
            assert "loss" in text_of(dash.query_one(TrainingPanel))
            assert peers.get_row_at(1)[6] != "–"  # the other peer's reward, as this node scored it
            # everything of the swarm panel fits in 80x24
            for w in (header, peers, plot, dash.query_one(TrainingPanel)):
                assert visible(w, size), w

            # panels switch with the keys; one at a time at this size
            await pilot.press("2")
            browser = dash.query_one(RolloutsBrowser)
            assert browser.display and not dash.query_one("#swarm-panel").display
            await until(pilot, lambda: dash.query_one(RolloutsTable).row_count > 0, "rollouts in the browser")
            assert "answer" in text_of(dash.query_one("#rollout-detail"))
            await pilot.press("tab")
            assert dash.query_one(LogPanel).display and dash.active == "log"
            await pilot.press("1")
            assert dash.query_one(PeersTable).display

            # pause: rounds stop advancing until resumed
            await pilot.press("p")
            await until(pilot, lambda: "paused" in text_of(header.query_one("#hdr-status")), "the paused state")
            done, at = len(metrics(app)), agent.round
            await pilot.pause(2.5)
            assert len(metrics(app)) == done and agent.round == at
            await pilot.press("p")
            await until(pilot, lambda: len(metrics(app)) > done, "a round after resuming")

            # quit: graceful stop, checkpoint, then the app exits
            await pilot.press("q")
            await until(pilot, lambda: app.return_value is not None, "the app to exit")
        return agent

    agent = asyncio.run(scenario())
    outcome = app.return_value
    assert not app.engine.alive and not outcome.forced and outcome.error is None
    last = agent.run_dir.latest_checkpoint()
    assert last is not None and last[0] == metrics(app)[-1]["round"]
    assert outcome.checkpoint == str(last[1])


@pytest.mark.timeout(900)
def test_demo_on_a_large_terminal_shows_every_panel(tmp_path):
    size = (140, 42)
    app = SwarmApp(factory(tmp_path, agents=3, experiment="demo"), autostart=True)

    async def scenario():
        async with running(app, size) as pilot:
            await dashboard_opens(pilot, app)
            dash = app.screen
            # the demo is a bootstrap peer and hivemind peers on this machine, and the header says so
            assert app.engine.agent.comm.__class__.__name__ == "HivemindComm"
            assert "mode dht" in text_of(dash.query_one("#hdr-swarm"))
            plot = dash.query_one(RewardPlot)
            await until(pilot, lambda: plot.points >= 2, "two rounds on the reward plot")
            await until(pilot, lambda: dash.query_one(PeersTable).row_count == 3, "three peers")
            for w in (dash.query_one(PeersTable), plot, dash.query_one(TrainingPanel), dash.query_one(RolloutsBrowser),
                      dash.query_one(LogPanel)):
                assert visible(w, size), w
            assert plot.region.width > 45 and plot.region.height > 15  # it scales up
            log = dash.query_one(LogPanel)
            assert any("round    1" in line.text for line in log.lines)  # drawn
            assert any("round    1" in line for line in log.texts)

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            help_text = text_of(app.screen.query_one("#help-text"))
            for b in DashboardScreen.BINDINGS:  # the help is made from the bindings
                assert (b.group.description if b.group else b.tooltip.split("\n")[0]) in help_text, b
            await pilot.press("escape")
            assert app.screen is dash
            await pilot.press("2", "enter")  # the highlighted rollout in full
            assert isinstance(app.screen, RolloutScreen)
            await pilot.press("escape")

            svg = app.save_screenshot(path=str(tmp_path), filename="dash.svg")
            assert app.engine.agent.name in Path(svg).read_text()

            await pilot.press("q")
            await until(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())
    for a in app.engine.agents:
        assert a.run_dir.latest_checkpoint() is not None, a.name


def test_errors_are_messages_on_the_join_screen_not_tracebacks(tmp_path):
    app = SwarmApp(factory(tmp_path))

    async def scenario():
        async with running(app, (80, 24)) as pilot:
            join = app.screen
            status = join.query_one("#join-status")
            # Until the first lookup has made this node's identity, Enter waits for it instead of checking the form.
            await until(pilot, lambda: "(from your peer id)" in join.query_one("#node_id").placeholder,
                        "the node id's default (the friendly name)")

            # Drive mode without a folder: explained, and nothing starts
            join.query_one("#mode").value = "drive"
            await pilot.pause()
            assert "needs the shared folder" in text_of(join.query_one("#mode-hint"))
            await pilot.press("enter")
            assert app.engine is None and "needs the shared folder" in text_of(status)
            # DHT mode with an empty swarm field would start a new swarm: the hint says so
            join.query_one("#mode").value = "dht"
            await pilot.pause()
            assert "starts a new swarm others can join" in text_of(join.query_one("#mode-hint"))
            join.query_one("#mode").value = "auto"

            # bad settings name the setting
            join.query_one("#swarm_groups").value = "-1"
            await pilot.press("enter")
            assert app.engine is None and "swarm_groups" in text_of(status)
            join.query_one("#swarm_groups").value = "4"

            # a model that does not exist: the engine reports it, the form stays to fix it
            join.query_one("#model").value = str(tmp_path / "no-such-model")
            await pilot.press("enter")
            await until(pilot, lambda: "cannot load model" in text_of(status), "the model error")
            assert isinstance(app.screen, JoinScreen) and "Traceback" not in text_of(status)
            assert not join.query_one("#model").disabled  # editable again
            await pilot.press("escape")
            await until(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())
    assert app.return_value.error.startswith("cannot load model")


@pytest.mark.parametrize("text,expected", [("", "local"), ("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc", "dht"),
                                           ("/content/drive/MyDrive/swarm", "drive")])
def test_auto_mode_reads_the_swarm_field(text, expected):
    from tui.join import resolve_mode

    assert resolve_mode("auto", text) == expected


@pytest.mark.parametrize("kind,data,message,field,value", [
    ("node_started", {"name": "ann", "first_round": 3, "model": "embedded"}, "NodeStarted", "first_round", 3),
    ("round_started", {"round": 4}, "RoundStarted", "round", 4),
    ("progress", {"round": 4, "stage": 1, "phase": "train", "done": 2, "total": 8}, "Progress", "stage", 1),
    ("rollouts_received", {"round": 4, "stage": 0, "groups": 2, "peers": ["b"], "peer_rewards": {"b": 0.5}},
     "RolloutsReceived", "peer_rewards", {"b": 0.5}),
    ("rollouts", {"round": 4, "stage": 0, "local_groups": 4, "swarm_groups": 2, "samples": []}, "Rollouts",
     "swarm_groups", 2),
    ("round_finished", {"round": 4, "loss": 0.1}, "RoundFinished", "round", 4),
    ("rounds_skipped", {"first": 5, "last": 6, "count": 2}, "RoundsSkipped", "last", 6),
    ("checkpoint_saved", {"round": 4, "path": "ck"}, "CheckpointSaved", "path", "ck"),
    ("resumed", {"round": 4, "checkpoint": "ck", "metrics_rows_dropped": 0}, "Resumed", "checkpoint", "ck"),
    ("evaluated", {"round": 4, "eval_reward": 0.5}, "Evaluated", "scores", {"eval_reward": 0.5}),
    ("paused", {"round": 4, "paused": True}, "Paused", "paused", True),
    ("node_stopped", {"round": 4, "clean": True}, "NodeStopped", "clean", True),
    ("error", {"message": "RuntimeError: x"}, "NodeError", "message", "RuntimeError: x"),
])
def test_each_event_kind_becomes_a_message_of_its_own_type(kind, data, message, field, value):
    from p2pswarm.events import Event
    from tui import engine

    m = engine.node_message(Event(kind, "peer", data, time=12.5))
    assert type(m) is getattr(engine, message) and getattr(m, field) == value and m.at == 12.5
    assert not m.bubble  # the dashboard hands it down to its panels: bubbling back up would loop


def test_an_event_the_ui_cannot_read_never_reaches_the_training_thread(tmp_path, caplog):
    from p2pswarm.events import Event
    from tui.engine import Engine, node_message

    assert node_message(Event("something_new", "peer", {})) is None
    posted = []
    engine = Engine(load_settings(runs_dir=tmp_path))
    engine._sink = posted.append
    engine._listener(Event("round_started", "peer", {}))  # no round: a bug in the UI, not in training
    assert posted == [] and "could not read a round_started event" in caplog.text


@pytest.mark.parametrize("mode", ["local", "dht", "drive"])
def test_every_join_mode_runs_a_transport_the_settings_accept(tmp_path, mode):
    from tui.join import MODES, mode_of

    settings = load_settings(runs_dir=tmp_path, comm=MODES[mode]["comm"], drive_path=str(tmp_path / "drive"))
    assert mode_of(settings) == mode  # and back: the header names the mode of settings made without the form


@pytest.mark.timeout(900)
def test_an_engine_failure_mid_run_is_a_message_in_the_ui(tmp_path, monkeypatch):
    from p2pswarm.trainer import GRPOTrainer

    def broken_train(self, state, progress=None):
        raise RuntimeError("the optimizer exploded")

    monkeypatch.setattr(GRPOTrainer, "train", broken_train)
    app = SwarmApp(factory(tmp_path, comm="inprocess"), autostart=True)  # about the UI, not the transport

    async def scenario():
        async with running(app, (80, 24)) as pilot:
            await dashboard_opens(pilot, app)
            dash = app.screen
            header = dash.query_one(HeaderBar)
            await until(pilot, lambda: "error" in text_of(header.query_one("#hdr-status")), "the error state")
            lines = dash.query_one(LogPanel).texts
            assert any("RuntimeError: the optimizer exploded" in line for line in lines), lines
            assert not any("Traceback" in line for line in lines)
            assert app.engine.error == "RuntimeError: the optimizer exploded"
            await pilot.press("q")  # the engine has stopped: q leaves at once
            await until(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())
    assert app.return_value.error == "RuntimeError: the optimizer exploded"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_join_screen_joins_a_real_swarm_over_the_dht(tmp_path):
    """A bootstrap peer and a headless peer run as processes; the UI joins them with the bootstrap's address.

    Every wait is on a condition (a log line, a metrics row, the UI showing it), bounded generously: on a
    loaded machine a process can take minutes to import torch and load its model, and the swarm's pace
    follows. Bob plays until he is killed, so nothing depends on him still being there after N rounds."""
    from helpers import Procs, metrics as peer_metrics, peer_cmd, start_bootstrap

    procs = Procs(tmp_path)
    try:
        boot = start_bootstrap(procs, "boot", "--coordinator")
        procs.start("bob", peer_cmd(tmp_path, "bob", boot, 1_000_000, "--set", "collect_timeout=30"))
        procs.wait_for("bob", r"node bob \(peer \w+\) starting at round", WAIT)
        deadline = time.monotonic() + WAIT
        while not peer_metrics(tmp_path, "bob"):  # a round played: Bob is in the swarm, publishing
            assert procs.procs["bob"].poll() is None and time.monotonic() < deadline, procs.log("bob")[-3000:]
            time.sleep(0.5)
        # This node waits long for Bob's batch (it stops waiting as soon as the batch is in): on a loaded
        # machine his generation can take longer than a normal collect_timeout.
        app = SwarmApp(factory(tmp_path, experiment="hm-test", host="127.0.0.1", tasks_per_round=4,
                               collect_timeout=120))

        async def scenario():
            async with running(app, (100, 30)) as pilot:
                join = app.screen
                join.query_one("#swarm").value = boot
                await pilot.pause()
                assert "joins through the bootstrap peers" in text_of(join.query_one("#mode-hint"))
                await pilot.press("enter")
                await dashboard_opens(pilot, app)
                assert app.engine.agent.comm.__class__.__name__ == "HivemindComm"
                assert "mode dht" in text_of(app.screen.query_one("#hdr-swarm"))
                # Bob shows up in the peers panel, and his rollouts reach this node's training.
                await until(pilot, lambda: any(p.name == "bob" for p in app.engine.agent.comm.peers()), "bob as a peer")
                await until(pilot, lambda: any(r["swarm_groups_received"] > 0 for r in metrics(app)), "bob's rollouts")
                table = app.screen.query_one(PeersTable)
                await until(pilot, lambda: "bob" in table.names.values(), "bob in the peers table")
                # Paused here, this node holds nobody up: Bob plays on at his own pace (no wait for it in
                # his collects, his holds, or the clock's quorum) until it plays again.
                await pilot.press("p")
                status = app.screen.query_one(HeaderBar).query_one("#hdr-status")
                await until(pilot, lambda: "paused" in text_of(status), "the paused state")
                played = len(peer_metrics(tmp_path, "bob"))
                await until(pilot, lambda: len(peer_metrics(tmp_path, "bob")) >= played + 4, "bob playing on meanwhile")
                await pilot.press("p")
                await pilot.press("q")
                await until(pilot, lambda: app.return_value is not None, "the app to exit")

        asyncio.run(scenario())
    finally:
        procs.kill_all()


@pytest.mark.timeout(900)
def test_with_a_chain_clock_the_header_follows_the_chains_round_and_shows_the_registration(tmp_path):
    pytest.importorskip("eth_tester", reason="the chain clock needs web3[tester] (the dev extra)")
    from web3 import HTTPProvider, Web3

    app = SwarmApp(factory(tmp_path, agents=2, comm="inprocess", chain="local", chain_round_seconds=1, chain_poll=0.2,
                           experiment="tui-chain", tasks_per_round=2), autostart=True)

    async def scenario():
        async with running(app, (80, 24)) as pilot:
            await dashboard_opens(pilot, app)
            header = app.screen.query_one(HeaderBar)
            line = header.query_one("#hdr-chain")
            # laid out on the screen's next refresh, which a loaded machine may not have reached yet
            await until(pilot, lambda: visible(line, (80, 24)), "the chain line in the header",
                        detail=lambda: str(line.region))

            def chain_round() -> int:
                words = text_of(line).split()
                return int(words[2]) if words[1:2] == ["round"] else -1

            await until(pilot, lambda: "registered, proof ok" in text_of(line), "this node's proven registration",
                        detail=lambda: text_of(line))
            assert "p2pswarm contract" in text_of(line)
            first = chain_round()
            # the agents advance the chain themselves once a round's deadline has passed; the header follows
            await until(pilot, lambda: chain_round() >= first + 2, "the chain's round advancing",
                        detail=lambda: text_of(line))
            assert chain_round() <= app.engine.agent.coordinator.client.round()[0]

            # the chain stops answering: a short state in the header, the last round read kept, no traceback
            client = app.engine.agent.coordinator.client
            client.contract = Web3(HTTPProvider("http://127.0.0.1:9")).eth.contract(address=client.address,
                                                                                    abi=client.abi)
            await until(pilot, lambda: "✖" in text_of(line), "the chain's failure", detail=lambda: text_of(line))
            assert chain_round() >= first + 2 and "Traceback" not in text_of(line)
            await pilot.press("q")
            await until(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())
    assert app.return_value.error is None


@pytest.mark.parametrize("reading,shown", [
    (None, "chain reading…"),
    (dict(round=3, stages=2, stage=1, registration="absent"), "chain round 3 · stage 2/2 · ✖ not registered"),
    (dict(round=3, registration="unproven", flavour="gensyn-0.4.2"), "chain round 3 · registered without proof · "
                                                                      "gensyn-0.4.2 contract · key 0xab12…ab12"),
    (dict(error="cannot reach the chain"), "chain ✖ cannot reach the chain"),  # never read: no round to show
    (dict(round=3, registration="proven", error="currentRound() on 0x1: timed out"),
     "chain round 3 · ✖ currentRound() on 0x1: timed out"),
])
def test_the_header_chain_line_says_the_round_the_registration_or_why_the_chain_failed(reading, shown):
    from p2pswarm.comm.chain.coordinator import ChainStatus
    from tui.widgets import chain_line

    status = None if reading is None else ChainStatus(**{"flavour": "p2pswarm", "eoa": "0x" + "ab12" * 10, **reading})
    assert chain_line(status).plain.startswith(shown)


@pytest.mark.timeout(900)
def test_reward_plot_draws_the_running_mean_and_the_held_out_curve(tmp_path):
    from p2pswarm.headless import AVG_WINDOW

    app = SwarmApp(factory(tmp_path, agents=1, comm="inprocess", eval_every=2, eval_size=8, tasks_per_round=2, threads=1),
                   autostart=True)

    async def scenario():
        async with running(app, (80, 24)) as pilot:
            await dashboard_opens(pilot, app)
            dash = app.screen
            plot = dash.query_one(RewardPlot)
            await until(pilot, lambda: plot.eval_points >= 2, "two held-out evaluations on the reward plot")
            await pilot.press("q")
            await until(pilot, lambda: app.return_value is not None, "the app to exit")
            return plot

    plot = asyncio.run(scenario())
    rows = metrics(app)
    mine = {m["round"]: m["reward_local_mean"] for m in rows}
    # the held-out curve: the node's evaluations, every eval_every rounds, as metrics.jsonl has them
    assert plot._eval == {m["round"]: m["eval_reward"] for m in rows if "eval_reward" in m}
    assert sorted(plot._eval)[:2] == [1, 3]
    # the running mean of this node's reward over the last AVG_WINDOW rounds, as the console's avg line
    trend = plot.trend()
    assert set(trend) == set(mine)
    for r in mine:
        window = [mine[x] for x in mine if r - AVG_WINDOW < x <= r]
        assert trend[r] == pytest.approx(sum(window) / len(window))
    assert "held-out" in RewardPlot.legend() and f"avg{AVG_WINDOW}" in RewardPlot.legend()

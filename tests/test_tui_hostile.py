"""The terminal UI against peers that choose hostile strings. A peer names itself (its Drive registration, its
gossip heartbeat) and writes the completions of the groups it shares; the dashboard shows both. Textual reads
a plain str in a table cell or a Static as markup, so a name such as `[/]` raised MarkupError while the
screen was drawn, which ended the app and the node's training with it; `[link=...]` made a hyperlink and
`[@click=app.quit]` a click that quits. Every such string must be drawn as the literal text it is.

The node is the real app in Drive mode on a real temporary folder; the hostile peers are real Drive
transports (p2pswarm.comm.drive.manager.FolderComm) in the same folder, with signed registrations and signed
rollout batches of real tasks, so their names and completions reach the dashboard the way any peer's do."""

from __future__ import annotations

import asyncio

import pytest
from textual.geometry import Region

from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.identity import Identity
from p2pswarm.node import GAME_BUILDERS
from p2pswarm.types import Group
from test_tui import dashboard_opens, factory, running, text_of, until
from tui import SwarmApp
from tui.dashboard import DashboardScreen
from tui.join import JoinScreen
from tui.widgets import PeersTable, RolloutsTable

# Valid names for every peer (1..64 printable characters: p2pswarm/validate.py), hostile for a markup parser.
HOSTILE_NAMES = ["[/]", "[bold]x", "[link=file:///etc/passwd]x[/link]", "a[/b]", "[@click=app.quit]q[/]",
                 "[$accent]y"]
# Completions are free text: markup, and an escape sequence that would clear the user's terminal.
HOSTILE_COMPLETIONS = ["[/] <answer>1</answer>", "[link=file:///etc/passwd]x[/link]", "a[/b] \x1b[2J",
                       "[bold]x[@click=app.quit]q"]
SIZE = (170, 50)  # wide enough for the longest name in its column


def screen_text(widget) -> tuple[str, list]:
    """What `widget` draws now (border included): its lines as plain text, and the styles of every segment."""
    strips = widget.render_lines(Region(0, 0, *widget.outer_size))
    return "\n".join(s.text for s in strips), [seg.style for s in strips for seg in s if seg.style is not None]


async def drawn_rows(pilot, table, rows) -> tuple[str, list]:
    """What `table` draws with each of `rows` scrolled into view in turn (the cursor on it)."""
    texts, styles = [], []
    for row in rows:
        table.move_cursor(row=row)
        await pilot.pause(0.05)
        text, st = screen_text(table)
        texts.append(text)
        styles += st
    return "\n".join(texts), styles


def hostile_peers(drive: str, settings, rounds: range) -> list[FolderComm]:
    """One real Drive peer per hostile name, registered in the folder, each with a signed batch of its own real
    tasks (the node re-derives them, so they are kept) for every round in `rounds`, stage 0."""
    peers = []
    for name in HOSTILE_NAMES:
        peer = FolderComm(drive, Identity.generate(), settings.experiment, name=name, timeout=1.0, poll=0.05,
                          peer_timeout=settings.drive_peer_timeout)
        peers.append(peer)
        data, _ = GAME_BUILDERS[settings.game](settings, peer.peer_id)
        for r in rounds:
            groups = [Group(t, HOSTILE_COMPLETIONS[: settings.num_generations], peer.peer_id)
                      for t in data.round_tasks(r)[:2]]
            # what publish() writes, without moving this peer's position: the node's clock is not theirs
            peer.store.write_atomic(peer.store.rollout_path(r, 0, peer.node), peer.encode(r, 0, groups))
    return peers


@pytest.mark.timeout(900)
def test_hostile_peer_names_and_completions_are_shown_as_text_and_the_node_plays_on(tmp_path):
    drive = str(tmp_path / "drive")
    make = factory(tmp_path, comm="drive", drive_path=drive, role="coordinator", collect_timeout=2,
                   round_deadline=4, drive_poll_interval=0.2, drive_peer_timeout=30, num_generations=4)
    app = SwarmApp(make, autostart=True)
    peers: list[FolderComm] = []

    async def scenario():
        async with running(app, SIZE) as pilot:
            await dashboard_opens(pilot, app)
            dash = app.screen
            peers.extend(hostile_peers(drive, make(), range(0, 60)))
            by_id = {p.peer_id: p.name for p in peers}
            table = dash.query_one(PeersTable)

            # every hostile peer is listed under its name, exactly as it chose it
            def names_shown() -> bool:
                return {k.value for k in table.rows} >= set(by_id)

            await until(pilot, names_shown, "the hostile peers in the peers table",
                        detail=lambda: f"rows: {[str(table.get_row_at(i)[0]) for i in range(table.row_count)]}")
            await pilot.pause(1.5)  # a refresh of the live table (every second) with them in it
            for peer_id, name in by_id.items():
                assert str(table.get_cell(peer_id, "name")) == name
            drawn, styles = await drawn_rows(pilot, table, range(table.row_count))
            for name in HOSTILE_NAMES:
                assert name in drawn, (name, drawn)
            assert not any(style.link for style in styles)  # no hyperlink to file:///etc/passwd
            assert not any(style.meta.get("@click") for style in styles)  # no action a click would run

            # their rollouts come in: the browser shows who sent them, and their completions, as text
            await pilot.press("2")
            rollouts = dash.query_one(RolloutsTable)

            def hostile_rows() -> set[str]:
                return {str(rollouts.get_row_at(i)[1]) for i in range(rollouts.row_count)} & set(HOSTILE_NAMES)

            await until(pilot, lambda: len(hostile_rows()) >= 2, "rollouts of the hostile peers in the browser",
                        detail=lambda: f"from: {[str(rollouts.get_row_at(i)[1]) for i in range(rollouts.row_count)]}")
            theirs = [i for i in range(rollouts.row_count) if str(rollouts.get_row_at(i)[1]) in HOSTILE_NAMES]
            drawn, styles = await drawn_rows(pilot, rollouts, theirs)
            for name in hostile_rows():
                assert name in drawn, (name, drawn)
            assert not any(style.link for style in styles)
            # the group in full: a hostile one, highlighted
            row = theirs[-1]
            rollouts.move_cursor(row=row)
            await pilot.pause(0.2)
            detail = dash.query_one("#rollout-detail")
            shown = text_of(detail)
            assert str(rollouts.get_row_at(row)[1]) in shown
            for c in HOSTILE_COMPLETIONS:
                assert c.replace("\x1b", "\\x1b") in shown, (c, shown)  # ESC shown as an escape, never sent
            drawn, styles = screen_text(detail)
            assert "\x1b" not in drawn and "[/] <answer>1</answer>" in drawn
            assert not any(style.link for style in styles)

            # and the node played on: a round finished after all this was drawn, in the same app
            played = len(app.engine.agent.run_dir.read_metrics())
            await until(pilot, lambda: len(app.engine.agent.run_dir.read_metrics()) > played, "another round")
            assert app.is_running and isinstance(app.screen, DashboardScreen) and app.engine.alive
            assert app.engine.error is None

    try:
        asyncio.run(scenario())
    finally:
        for p in peers:
            p.close()
    assert app.return_value is None or app.return_value.error is None


@pytest.mark.timeout(300)
def test_a_failure_that_quotes_markup_is_shown_as_text_on_the_join_screen(tmp_path):
    """A reason for the user quotes what it is about (here the model's path, in other cases a peer's words):
    shown as it is, markup and all (textual.markup.escape left `[$accent]` to the parser, which ate it)."""
    model = str(tmp_path / "[$accent]no[/]such[link=file:/etc/passwd]x")
    app = SwarmApp(factory(tmp_path, model=model), autostart=True)

    async def scenario():
        async with running(app, (120, 30)) as pilot:
            join = app.screen
            assert isinstance(join, JoinScreen)
            status = join.query_one("#join-status")
            await until(pilot, lambda: "cannot load model" in text_of(status), "the model error",
                        detail=lambda: text_of(status))
            assert model in text_of(status)
            drawn, styles = screen_text(status)
            drawn = "".join(line.rstrip() for line in drawn.splitlines())  # a long path wraps
            assert model[model.index("[$accent]"):] in drawn, drawn
            assert not any(style.link for style in styles)
            assert isinstance(app.screen, JoinScreen) and app.is_running
            await pilot.press("escape")
            await until(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())

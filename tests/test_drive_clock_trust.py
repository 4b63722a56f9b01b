"""The Drive round clock is an unsigned file anyone who writes to the folder can rewrite (the fork's format has
no room for a signature): a reading is adopted only as far as the live nodes' signed registrations support
it (comm/drive/coordinator.py), and a jump past that is counted, logged once and forgotten. Real folders, real
FolderComm heartbeat threads, real node processes for the swarm; every wait is bounded."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from helpers import (ENDLESS, HANG, PROCESS_TEST_TIMEOUT, drive_clock, drive_cmd, events, kill_tree, make_settings,
                     metrics, until, wait_until)
from p2pswarm import events as ev
from p2pswarm.comm.drive.coordinator import CATCH_UP, CLOCK_MARGIN, MAX_CLOCK, FolderCoordinator
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.identity import Identity

EXP = "clock-trust"
HUGE = 2**31 - 1  # the largest round parse_clock reads; a node that played it could not register the next
LOGGER = "p2pswarm.comm.drive.coordinator"


def comm(url, name, **kw):
    kw.setdefault("timeout", 1.0)
    kw.setdefault("poll", 0.02)
    kw.setdefault("peer_timeout", 5.0)
    return FolderComm(url, Identity.generate(), EXP, name=name, **kw)



def forge(store, round: int, **fields) -> None:
    """What a hostile writer puts in state/current_state.json: any round, in our format or the fork's."""
    store.write_atomic(store.state_path(), json.dumps({"round": round, "stage": 0, **fields}).encode())


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ---- followers ---------------------------------------------------------------------------------------------------
def test_a_forged_clock_is_ignored_counted_logged_once_and_not_sticky(tmp_path, caplog):
    url = str(tmp_path)
    w, peer = comm(url, "w"), comm(url, "peer")
    follower, store = FolderCoordinator(w), w.store
    try:
        peer.set_position(finished=2)
        w.set_position(finished=2)
        forge(store, 3)
        assert until(lambda: follower.next_round(2) == 3)  # the honest clock, one past what both finished

        with caplog.at_level(logging.INFO, logger=LOGGER):
            for forged in (HUGE, 3 + 10**5, 2 + CLOCK_MARGIN + 1):  # huge, moderate, just past the margin
                forge(store, forged)
                assert follower.next_round(2) == 3 and follower.start_round(0) == 3 and follower.current() == 3
        assert follower.clock == 3 and follower.refused == 9
        assert w.counters()["dropped_implausible_clock"] == 9
        assert len(warnings(caplog)) == 1 and f"holds round {HUGE}" in warnings(caplog)[0]  # one line for the run

        forge(store, 3)  # restored: the clock as it was, nothing of the forgery kept
        assert follower.next_round(2) == 3 and follower.clock == 3
        peer.set_position(finished=3)
        w.set_position(finished=3)
        forge(store, 4)
        assert until(lambda: follower.next_round(3) == 4)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            forge(store, HUGE)  # a new forgery after a plausible reading: logged again, once
            assert follower.next_round(3) == 4 and follower.next_round(3) == 4
        assert len(warnings(caplog)) == 1
    finally:
        w.close()
        peer.close()


def test_a_follower_legitimately_far_behind_still_catches_up(tmp_path):
    """A node restarted from an old checkpoint (round 3) into a swarm whose live nodes finished round 499:
    their signed registrations support the clock at 500, so it jumps there at once."""
    url = str(tmp_path)
    a, b, w = comm(url, "a"), comm(url, "b"), comm(url, "w")
    try:
        a.set_position(round=500, finished=499)
        b.set_position(round=499, finished=498)  # a registration a round behind (a synced mount's lag)
        forge(w.store, 500, coordinator=a.peer_id)
        follower = FolderCoordinator(w)
        assert until(lambda: follower.start_round(3) == 500)
        assert follower.refused == 0
        # Only what a live node finished counts: once they have left, the next jump is not supported.
        a.close()
        b.close()
        w.set_position(finished=500)
        forge(w.store, 600)
        assert until(lambda: follower.next_round(500) == 501) and follower.refused >= 1
    finally:
        for c in (a, b, w):
            c.close()


def test_a_signed_claim_cannot_take_a_follower_past_max_clock(tmp_path):
    """Anyone may register (a fresh identity is free), and a registration may claim any finished round up to
    2**31 - 1: no reading at or past MAX_CLOCK is adopted, whatever is claimed, so no node is ever sent where
    it could not register its next round."""
    url = str(tmp_path)
    liar, w = comm(url, "liar"), comm(url, "w")
    follower = FolderCoordinator(w)
    try:
        liar.set_position(round=HUGE - 1, finished=HUGE - 1)
        forge(w.store, HUGE)
        assert until(lambda: "liar" in w.live())
        assert follower.next_round(0) == 1 and follower.refused == 1
        forge(w.store, MAX_CLOCK)
        assert follower.next_round(1) == 2 and follower.clock < MAX_CLOCK
    finally:
        liar.close()
        w.close()


# ---- the keeper ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("forged", [HUGE, 42 + 10**5])
def test_a_keeper_restarted_against_a_forged_clock_sets_it_aside_and_catches_up(tmp_path, forged, caplog):
    """The keeper died at round 42 (both workers finished round 41); meanwhile someone wrote a round into the
    clock file, in our format and naming the keeper. The restarted keeper does not adopt it: the file is kept
    aside, and the round rule brings the clock to 42 from the workers' registrations."""
    url = str(tmp_path)
    w1, w2 = comm(url, "w1"), comm(url, "w2")
    identity = Identity.generate()
    for w in (w1, w2):
        w.set_position(round=41, finished=41)
    forged_bytes = json.dumps({"round": forged, "stage": 0, "coordinator": identity.peer_id,
                               "coordinator_name": "coord"}).encode()
    w1.store.write_atomic(w1.store.state_path(), forged_bytes)
    c = FolderComm(url, identity, EXP, name="coord", role="coordinator", timeout=1.0, poll=0.02, peer_timeout=5.0)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            keeper = FolderCoordinator(c, role="coordinator", deadline=1000)
            assert keeper.clock == -1 and w1.store.read_clock()["round"] == forged  # not judged before start_round
            assert keeper.start_round(0) == 42  # no checkpoint of its own: where the live workers are
        assert keeper.clock == 42 and w1.store.read_clock()["round"] == 42
        aside = list(Path(w1.store.path("state")).glob("current_state.json.implausible-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == forged_bytes  # kept as it was, not overwritten
        assert len(warnings(caplog)) == 1 and f"holds round {forged}," in warnings(caplog)[0]
        assert "kept as" in warnings(caplog)[0] and c.counters()["dropped_implausible_clock"] == 1
        assert not any(m in r.getMessage() for r in caplog.records for m in ("clock resumed at", "clock adopted at"))
        assert FolderCoordinator(w1).next_round(41) == 42  # a follower follows the honest clock again
        keeper.close()
    finally:
        for x in (c, w1, w2):
            x.close()


def test_a_lone_keeper_resumes_its_own_clock_from_its_checkpoint(tmp_path, caplog):
    """Nobody else is live, so only the keeper's own progress can vouch for its clock: at start_round, its
    checkpoint says it finished round 11, and the clock file's 12 is adopted without a word of warning."""
    url = str(tmp_path)
    identity = Identity.generate()
    c = FolderComm(url, identity, EXP, name="coord", role="coordinator", timeout=1.0, poll=0.02, peer_timeout=5.0)
    first = FolderCoordinator(c, role="coordinator", deadline=1000)
    first.close()
    c.set_position(finished=11)
    first.write_clock(12)
    c.close()
    again = FolderComm(url, identity, EXP, name="coord", role="coordinator", timeout=1.0, poll=0.02, peer_timeout=5.0)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            keeper = FolderCoordinator(again, role="coordinator", deadline=1000)
            assert keeper.start_round(12) == 12 and keeper.clock == 12
        assert any("round clock resumed at round 12" in r.getMessage() for r in caplog.records)
        assert not warnings(caplog) and not list(Path(again.store.path("state")).glob("*.implausible-*"))
    finally:
        again.close()


def test_the_keepers_catch_up_is_capped_and_costs_one_listing_and_one_write_a_pass(tmp_path):
    """A live registration says it finished round 10**5 while the keeper has not played yet: every round up to
    it is over by the rule, but one pass advances CATCH_UP of them at most, reading the registrations once and
    writing the clock once."""
    url = str(tmp_path)
    ahead = comm(url, "ahead")
    c = comm(url, "coord", role="coordinator")
    keeper = FolderCoordinator(c, role="coordinator", quorum=1, deadline=1000)  # collect_peers=1: one finisher ends a round
    keeper.close()  # driven by hand
    writes, listings = [], []
    store = c.store
    write, listing = store.write_atomic, store.listing
    store.write_atomic = lambda path, data: (writes.append(path), write(path, data))[1]
    store.listing = lambda folder: (listings.append(folder), listing(folder))[1]
    try:
        ahead.set_position(round=10**5, finished=10**5)
        assert until(lambda: "ahead" in c.live())
        writes.clear()
        listings.clear()
        assert keeper.advance() == CATCH_UP and keeper.clock == CATCH_UP
        assert [p for p in writes if "/state/" in p] == [store.state_path()] and listings == [store.path("peers")]
        assert store.read_clock()["round"] == CATCH_UP
        assert keeper.advance() == CATCH_UP and keeper.clock == 2 * CATCH_UP
    finally:
        c.close()
        ahead.close()


# ---- skipped rounds are a span --------------------------------------------------------------------------------------
def test_a_large_jump_is_one_span_in_the_events_and_the_log(tmp_path, caplog):
    """A Drive node joins a swarm whose live member finished round 999,999 (its signed registration) and whose
    clock is at 1,000,000: it skips a million rounds, reported as one (first, last, count) span, never a list."""
    from p2pswarm.headless import ConsolePrinter
    from p2pswarm.node import build_swarm, run_agents

    drive = tmp_path / "drive"
    drive.mkdir()
    jump = 10**6
    member = FolderComm(str(drive), Identity.generate(), EXP, name="member", timeout=1.0, poll=0.02, peer_timeout=30.0)
    try:
        member.set_position(round=jump, finished=jump - 1)
        forge(member.store, jump)
        s = make_settings(tmp_path, comm="drive", drive_path=str(drive), experiment=EXP, role="worker",
                          collect_timeout=1, tasks_per_round=2, threads=1)
        (agent,) = build_swarm(s)
        agent.events.subscribe(ConsolePrinter(agent.name, show_name=False, progress_bar=False))
        with caplog.at_level(logging.INFO, logger="p2pswarm"):
            run_agents([agent], rounds=jump + 1)
    finally:
        member.close()
    assert [m["round"] for m in metrics(agent)] == [jump]
    lines = (agent.run_dir.path / "events.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in lines if '"rounds_skipped"' in line]
    assert len(skipped) == 1 and len(lines[[i for i, line in enumerate(lines) if '"rounds_skipped"' in line][0]]) < 300
    e = skipped[0]
    assert (e["first"], e["last"], e["count"]) == (0, jump - 1, jump) and "skipped" not in e
    said = [r.getMessage() for r in caplog.records if "skipped round(s)" in r.getMessage()]
    assert said == [f"skipped round(s) [0..{jump - 1}] ({jump} rounds) to follow the swarm"]
    assert ev.span_text(7, 7) == "[7] (1 round)"


# ---- a real swarm and a hostile writer -------------------------------------------------------------------------------
def node_cmd(tmp_path, name, role, rounds, *settings):
    return drive_cmd(tmp_path / "drive", tmp_path / "runs" / name, name, role, rounds, "round_deadline=240",
                     "collect_timeout=240", *settings, experiment=EXP)


class Forger(threading.Thread):
    """Keeps the clock file forged: whenever it holds something else (the keeper's honest write), it is
    replaced within a few milliseconds by `round_for(honest)`; `restore()` puts the last honest one back and stops."""

    def __init__(self, state: Path):
        super().__init__(name="forger", daemon=True)
        self.state, self.honest, self.forged = state, -1, set()
        self.round_for = lambda honest: HUGE
        self.done = threading.Event()

    def read(self) -> int:
        try:
            return json.loads(self.state.read_text())["round"]
        except (OSError, ValueError, KeyError):
            return -1

    def write(self, round: int) -> None:
        tmp = self.state.with_name(".forged.tmp")
        tmp.write_text(json.dumps({"round": round, "stage": 0, "updated_at": time.time(), "updated_by": "coordinator"}))
        os.replace(tmp, self.state)

    def run(self) -> None:
        while not self.done.wait(0.005):
            now = self.read()
            if now < 0 or now in self.forged:
                continue
            self.honest = max(self.honest, now)
            forged = self.round_for(self.honest)
            self.forged.add(forged)
            self.write(forged)

    def restore(self) -> None:
        self.done.set()
        self.join(5)
        self.write(self.honest)


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_honest_workers_keep_their_rounds_while_a_writer_forges_the_clock(tmp_path, procs):
    """A coordinator and two workers play 6 rounds through a folder while a writer forges the clock file: a
    huge round (2**31 - 1), then a moderate jump (the honest round + 10**5), then the honest round put back.
    Every node plays every round, each with both others' batches (nobody drops out of the swarm), none is
    skipped, and each worker says once per forgery run that it ignored the file."""
    rounds, names = 6, ("coord", "w1", "w2")
    state = tmp_path / "drive" / "experiments" / EXP / "state" / "current_state.json"
    for n in names:  # each waits for both others' batches, however late one of them starts
        procs.start(n, node_cmd(tmp_path, n, "coordinator" if n == "coord" else "worker", rounds, "collect_peers=2"))
    wait_until(lambda: drive_clock(tmp_path / "drive", EXP) >= 0, HANG, "the clock file", lambda: procs.log("coord"))
    forger = Forger(state)
    forger.start()
    try:
        done = lambda: min(len(metrics(tmp_path, n)) for n in names)  # noqa: E731
        wait_until(lambda: done() >= 2, HANG, "two rounds under a huge forged clock", lambda: procs.log("w1"))
        forger.round_for = lambda honest: honest + 10**5
        wait_until(lambda: done() >= 4, HANG, "two rounds under a moderate forged jump", lambda: procs.log("w1"))
    finally:
        forger.restore()
    for n in names:
        procs.wait_exit(n, HANG)
    for n in names:
        rows = metrics(tmp_path, n)
        assert [r["round"] for r in rows] == list(range(rounds)), n
        assert all(r["swarm_groups_received"] == 2 * 4 for r in rows), (n, [r["swarm_groups_received"] for r in rows])
        assert not [e for e in events(tmp_path, n) if e["kind"] == "rounds_skipped"], n
    refused = 0
    for n in ("w1", "w2"):
        count = metrics(tmp_path, n)[-1]["comm"].get("dropped_implausible_clock", 0)
        told = procs.log(n).count("(a forged or corrupt file?)")
        assert 1 <= told <= count, (n, told, count)
        refused += count
    assert refused >= 2
    assert HUGE in forger.forged and any(10**5 <= f < 10**5 + rounds for f in forger.forged)  # both were in the file
    assert drive_clock(tmp_path / "drive", EXP) < 100  # the honest clock in the end


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_a_keeper_restarted_against_a_forged_clock_file_keeps_the_swarm_on_its_rounds(tmp_path, procs):
    """The coordinator is killed mid-run and the clock file forged (round 2**31 - 1, naming the coordinator)
    before it restarts: it does not adopt it (the file is kept aside) and joins the workers at their round,
    not at 2**31 - 1 nor back at 0; the workers, who never left the swarm, play every round once."""
    names = ("coord", "w1", "w2")
    common = ("collect_peers=0", "drive_peer_timeout=10")  # all live nodes: a dead one is not waited for long
    for n in names:
        procs.start(n, node_cmd(tmp_path, n, "coordinator" if n == "coord" else "worker", ENDLESS, *common))
    base = tmp_path / "drive" / "experiments" / EXP
    wait_until(lambda: drive_clock(tmp_path / "drive", EXP) >= 2 or procs["coord"].poll() is not None, HANG,
               "the clock at round 2", lambda: procs.log("coord"))
    kill_tree(procs["coord"])
    before = drive_clock(tmp_path / "drive", EXP)
    coord_id = json.loads((base / "peers" / "coord.json").read_text())["peer_id"]
    forged = json.dumps({"round": HUGE, "stage": 0, "coordinator": coord_id, "coordinator_name": "coord"})
    (base / "state" / ".forged.tmp").write_text(forged)
    os.replace(base / "state" / ".forged.tmp", base / "state" / "current_state.json")
    procs.start("coord", node_cmd(tmp_path, "coord", "coordinator", ENDLESS, *common))
    procs.wait_for("coord", rf"holds round {HUGE}, .*\(kept as ", HANG)

    def since_restart():
        log = events(tmp_path, "coord")
        starts = [i for i, e in enumerate(log) if e["kind"] == "node_started"]
        return log[starts[-1]:] if len(starts) >= 2 else []

    wait_until(lambda: sum(e["kind"] == "round_finished" for e in since_restart()) >= 3, HANG,
               "three rounds of the restarted coordinator", lambda: procs.log("coord"))
    for n in names:
        procs.stop(n)
    aside = list((base / "state").glob("current_state.json.implausible-*"))
    assert len(aside) == 1 and aside[0].read_text() == forged
    first = next(e["round"] for e in since_restart() if e["kind"] == "round_started")
    assert before <= first < 1000 and before <= drive_clock(tmp_path / "drive", EXP) < 1000
    assert "round clock resumed" not in procs.log("coord").split(f"holds round {HUGE}")[-1]
    coord_rounds = {e["round"] for e in since_restart() if e["kind"] == "round_finished"}
    for n in ("w1", "w2"):
        played = [m["round"] for m in metrics(tmp_path, n)]
        skipped = [r for e in events(tmp_path, n) if e["kind"] == "rounds_skipped" for r in range(e["first"], e["last"] + 1)]
        assert len(played) == len(set(played)) and max(played) < 1000, (n, played)
        assert sorted(set(played) | set(skipped)) == list(range(max(played) + 1)), (n, played, skipped)
        heard = {e["round"] for e in events(tmp_path, n) if e["kind"] == "rollouts_received" and coord_id in e["peers"]}
        assert heard & coord_rounds, n  # the restarted coordinator and the workers played rounds together

"""Drive mode: the swarm through a shared folder. Real processes on a real temporary folder, and the store's
parts in-process (memory:// and a temp folder). Every wait is bounded; every process started is killed."""

import json
import os
import time
from pathlib import Path

import pytest

from helpers import HANG, PROCESS_TEST_TIMEOUT, drive_clock, drive_cmd, events, kill_tree, metrics, until, wait_until
from p2pswarm import wire
from p2pswarm.comm.drive.coordinator import FolderCoordinator
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.comm.drive.store import FolderStore
from p2pswarm.identity import Identity
from p2pswarm.types import Group, Task

EXP = "drive-test"


def group(i=0):
    return Group(Task(f"t{i}", "d", "q", "a"), ["x", "y"], "p", [1.0, 0.0])


def comm(url, name, **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("poll", 0.02)
    kw.setdefault("peer_timeout", 5.0)
    return FolderComm(url, Identity.generate(), EXP, name=name, **kw)



# ---- processes -----------------------------------------------------------------------------------------
def node_cmd(tmp_path, name, role, rounds, *settings):
    return drive_cmd(tmp_path / "drive", tmp_path / "runs" / name, name, role, rounds, "round_deadline=5", *settings,
                     experiment=EXP)


def clock(tmp_path):
    return drive_clock(tmp_path / "drive", EXP)


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_coordinator_and_three_workers_train_three_rounds_through_the_folder(tmp_path, procs):
    names = ["coord", "w1", "w2", "w3"]
    for n in names:  # each waits for all three others' batches, however late one of them starts
        procs.start(n, node_cmd(tmp_path, n, "coordinator" if n == "coord" else "worker", 3,
                                "collect_peers=3", "collect_timeout=240", "keep_rounds=0"))
    for n in names:
        procs.wait_exit(n, HANG)
    ids = {}
    for n in names:
        ids[n] = json.loads((tmp_path / "drive" / "experiments" / EXP / "peers" / f"{n}.json").read_text())["peer_id"]
    for n in names:
        rows = metrics(tmp_path, n)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["swarm_groups_received"] == 3 * 4 for r in rows), rows  # all three others, every round
        received = [e for e in events(tmp_path, n) if e["kind"] == "rollouts_received"]
        assert all(set(e["peers"]) == set(ids.values()) - {ids[n]} for e in received)
    base = tmp_path / "drive" / "experiments" / EXP
    for r in range(3):
        assert sorted(p.name for p in (base / "rollouts" / f"round_{r}" / "stage_0").iterdir()) == \
            sorted(f"{n}.msgpack" for n in names)
    assert clock(tmp_path) >= 2
    state = json.loads((base / "state" / "current_state.json").read_text())
    assert state["coordinator"] == ids["coord"]
    peer = json.loads((base / "peers" / "w1.json").read_text())
    assert {"peer_id", "name", "round", "stage", "time"} <= set(peer) and peer["left"] is True
    assert not list(base.rglob("*.tmp"))


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_a_killed_coordinator_restarts_without_rewinding_and_workers_finish(tmp_path, procs):
    """Each node waits for every live node's batch (collect_peers=0; a dead node's heartbeat goes stale in
    10 s), so the workers play in step whatever the machine's load: none races to the end while the other
    lags rounds behind."""
    rounds = 12
    common = ("collect_peers=0", "collect_timeout=240", "drive_peer_timeout=10")
    procs.start("coord", node_cmd(tmp_path, "coord", "coordinator", rounds, *common))
    for n in ("w1", "w2"):
        procs.start(n, node_cmd(tmp_path, n, "worker", rounds, *common))
    wait_until(lambda: clock(tmp_path) >= 2 or procs["coord"].poll() is not None, HANG, "the clock at round 2",
               lambda: procs.log("coord"))
    before = clock(tmp_path)
    assert before >= 2, procs.log("coord")[-3000:]
    kill_tree(procs["coord"])
    assert clock(tmp_path) >= before
    procs.start("coord", node_cmd(tmp_path, "coord", "coordinator", rounds, *common))
    seen = [clock(tmp_path)]
    end = time.monotonic() + HANG
    while any(p.poll() is None for p in procs.procs.values()) and time.monotonic() < end:
        seen.append(clock(tmp_path))
        time.sleep(0.05)
    assert seen == sorted(seen) and seen[0] >= before, "the round clock went back"
    for n in ("w1", "w2", "coord"):
        procs.wait_exit(n, 5)
    for n in ("w1", "w2"):
        # Every round was either played or skipped to follow the clock (a restarted coordinator may catch
        # up several finished rounds at once), and none was played twice.
        played = [m["round"] for m in metrics(tmp_path, n)]
        skipped = [r for e in events(tmp_path, n) if e["kind"] == "rounds_skipped"
                   for r in range(e["first"], e["last"] + 1)]  # a span (first, last): a few rounds here
        assert len(played) == len(set(played)) and sorted(set(played) | set(skipped)) == list(range(rounds))
        assert played[-1] >= rounds - 2
    log = procs.log("coord")
    assert "round clock resumed at round" in log
    second_start = [e for e in events(tmp_path, "coord") if e["kind"] == "node_started"][-1]
    after = events(tmp_path, "coord")[events(tmp_path, "coord").index(second_start):]
    first_played = next(e["round"] for e in after if e["kind"] == "round_started")
    assert first_played >= before  # the restarted coordinator joined at the clock, not at round 0


# ---- in-process ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["memory://hostile", "TMP"])
def test_hostile_files_are_skipped_and_counted(url, tmp_path):
    url = str(tmp_path / "drive") if url == "TMP" else url
    alice, mallory = comm(url, "alice"), comm(url, "mallory", timeout=0.2)
    mallory.set_ban_policy(0, 30)  # see every kind counted (a ban would skip alice's files after three)
    try:
        store = alice.store
        good = wire.encode(wire.RolloutBatch(EXP, 0, 0, alice.peer_id, [group()]), alice.identity)
        forged = bytearray(good)
        forged[-3] ^= 0xFF
        other_swarm = wire.encode(wire.RolloutBatch("other", 0, 0, alice.peer_id, [group()]), alice.identity)
        far_round = wire.encode(wire.RolloutBatch(EXP, 9, 0, alice.peer_id, [group()]), alice.identity)
        next_round = wire.encode(wire.RolloutBatch(EXP, 1, 0, alice.peer_id, [group()]), alice.identity)
        write = lambda data, r=0: store.write_atomic(store.rollout_path(r, 0, "alice"), data)  # noqa: E731
        cases = [(b"\x93garbage", "malformed"), (good[: len(good) // 2], "malformed"),
                 (b"\x00" * (wire.Limits().max_bytes + 1), "too_large"), (bytes(forged), "bad_signature"),
                 (other_swarm, "wrong_swarm"), (far_round, "round_window"), (next_round, "wrong_slot")]
        for data, reason in cases:
            write(data)
            assert mallory.collect(0, 0) == []
            assert mallory.inbox.drops[reason] >= 1, (reason, dict(mallory.inbox.drops))
        # an impostor's file under alice's name, signed by the impostor: not alice's peer id
        eve = Identity.generate()
        write(wire.encode(wire.RolloutBatch(EXP, 0, 0, eve.peer_id, [group()]), eve))
        assert mallory.collect(0, 0) == [] and mallory.inbox.drops["wrong_peer"] == 1
        # a bridge-style file name whose origin is not a peer id: never a per-peer key, counted under alice
        store.write_atomic(f"{store.stage_dir(0, 0)}/alice~not-a-peer.msgpack", good)
        assert mallory.collect(0, 0) == []
        # a forged registration for alice is refused
        store.write_atomic(store.path("peers", "ghost.json"), b'{"peer_id": "12D3KooWx", "time": 1}')
        # and the honest file, arriving late, is still taken
        alice.publish(0, 0, [group()])
        assert len(mallory.collect(0, 0)) == 1
        c = mallory.counters()
        assert c["batches_received"] == 1 and c["dropped_bad_registration"] >= 1
        # counted under the peer id the file's node registered (the name is the registration's)
        per = c["per_peer"][alice.peer_id]  # rows are keyed by peer id; the name is display only
        assert per["name"] == "alice"
        assert per["batches"] == 1 and per["dropped_bad_signature"] >= 1 and per["dropped_wrong_peer"] == 1
        assert per["dropped_bad_file_name"] == 1 and "not-a-peer" not in c["per_peer"]
        # read once: polling again does not re-read the file
        reads = c["files_read"]
        mallory.collect(0, 0)
        assert mallory.counters()["files_read"] == reads
    finally:
        alice.close()
        mallory.close()


def test_relayed_files_count_under_their_signer_and_are_not_passed_on_again(tmp_path):
    url = str(tmp_path / "drive")
    reader, bridge, alice = comm(url, "reader", timeout=30.0), comm(url, "bridge"), comm(url, "alice")
    outsider = Identity.generate()  # a DHT-side peer: never registered in the folder
    passed = []
    reader.on_accept = lambda r, s, peer, data: passed.append(peer)
    try:
        bridge.bridged = 1  # it relays one peer of the other side: readers wait for 2 live nodes + 1
        bridge.publish(0, 0, [group()])
        alice.publish(0, 0, [group()])
        bridge.relay(0, 0, outsider.peer_id, wire.encode(wire.RolloutBatch(EXP, 0, 0, outsider.peer_id, [group()]), outsider))
        got = reader.collect(0, 0)
        assert sorted(g.peer for g in got) == sorted([alice.peer_id, bridge.peer_id, outsider.peer_id])
        assert reader.last_collect_seconds < 30  # the quorum (3, with the relayed one) ended it, not the timeout
        per = reader.counters()["per_peer"]
        row = per[outsider.peer_id]  # rows are keyed by peer id
        assert {k: row.get(k) for k in ("batches", "groups", "relayed")} == {"batches": 1, "groups": 1, "relayed": 1}
        assert per[alice.peer_id]["batches"] == 1 and "relayed" not in per[alice.peer_id]
        assert sorted(passed) == sorted([alice.peer_id, bridge.peer_id])  # the relayed batch is not passed on again
        assert bridge.counters()["batches_relayed"] == 1 and reader.live_peers() == {alice.peer_id, bridge.peer_id}
    finally:
        for c in (reader, bridge, alice):
            c.close()


def test_atomic_write_never_shows_a_partial_file(tmp_path, monkeypatch):
    store = FolderStore(str(tmp_path), EXP)
    path = store.rollout_path(0, 0, "n")
    store.write_atomic(path, b"old")

    def crash(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_atomic(path, b"new bytes that never land")
    monkeypatch.undo()
    folder = Path(path).parent
    assert [p.name for p in folder.iterdir()] == ["n.msgpack"] and Path(path).read_bytes() == b"old"
    assert [name for name, _, _ in store.listing(str(folder))] == ["n.msgpack"]
    # a temporary another writer is still writing is never listed
    (folder / ".m.msgpack.1.0.tmp").write_bytes(b"half")
    assert [name for name, _, _ in store.listing(str(folder))] == ["n.msgpack"]
    mem = FolderStore("memory://atomic", EXP)
    mem.write_atomic(mem.rollout_path(0, 0, "n"), b"x")
    assert mem.fs.find(mem.root) == [mem.rollout_path(0, 0, "n")]


def _rounds(store):
    return sorted(int(p.split("_")[-1]) for p in store.subfolders(store.path("rollouts")))


@pytest.mark.parametrize("url", ["memory://janitor", "TMP"])
def test_janitor_keeps_the_last_rounds_and_the_clock_never_rewinds(url, tmp_path):
    url = str(tmp_path / "drive") if url == "TMP" else url
    c = comm(url, "coord", role="coordinator")
    coord = FolderCoordinator(c, role="coordinator", keep_rounds=2, deadline=1000)
    try:
        for r in range(6):
            c.publish(r, 0, [group()])
            coord.report_finished(r)  # as the round loop does after training: the clock moves on finished rounds
            coord.next_round(r)
        end = time.monotonic() + 10
        while coord.clock < 6 and time.monotonic() < end:
            time.sleep(0.02)
        assert coord.clock == 6
        coord.janitor()
        assert _rounds(c.store) == [4, 5]
        coord.close()
        # a restarted coordinator reads the clock back; a worker follows it
        again = FolderCoordinator(c, role="coordinator", keep_rounds=2)
        assert again.clock == 6 and again.start_round(0) == 6
        with pytest.raises(ValueError):
            again.write_clock(3)
        again.close()
        worker = FolderCoordinator(comm(url, "w"))
        assert worker.start_round(2) == 6 and worker.next_round(6) == 7 and worker.next_round(3) == 6
        worker.comm.close()
    finally:
        c.close()


def test_a_keeper_that_stops_leaves_the_clock_past_the_rounds_it_finished(tmp_path):
    """A keeper plays its last rounds faster than its clock thread polls, then stops: closing advances the
    clock over every round that is over, so a follower, the fork's readers and the keeper restarted do not
    start a round it already played. A round a live worker still plays is not ended by closing."""
    url = str(tmp_path / "drive")
    c = comm(url, "coord", role="coordinator", poll=3600.0)  # the thread never gets to step
    keeper = FolderCoordinator(c, role="coordinator", deadline=1000)
    w = FolderCoordinator(comm(url, "w", poll=0.02))
    try:
        for r in range(3):
            c.publish(r, 0, [group()])
            w.comm.publish(r, 0, [group()])
            keeper.report_finished(r)
            if r < 2:
                w.report_finished(r)
        assert until(lambda: c.live().get("w") is not None and c.live()["w"].finished == 1)
        assert keeper.clock == 0 and c.store.read_clock()["round"] == 0
        c.close()  # runs the keeper's close
        assert c.store.read_clock()["round"] == 2  # rounds 0 and 1 are over; w still plays round 2
        assert FolderCoordinator(comm(url, "w2")).start_round(0) == 2
    finally:
        w.comm.close()


def test_archive_failure_keeps_the_rounds(tmp_path):
    c = comm(str(tmp_path), "coord", role="coordinator")
    coord = FolderCoordinator(c, role="coordinator", keep_rounds=1, archive=True, deadline=1000)
    coord.close()  # drive it by hand
    try:
        for r in range(4):
            c.publish(r, 0, [group()])
            coord.report_finished(r)
            coord.next_round(r)
        while coord.step():
            pass
        assert coord.clock == 4
        base = Path(c.store.base)
        (base / "archive").write_text("a file where the archive folder should be")
        coord.janitor()
        assert _rounds(c.store) == [0, 1, 2, 3]  # nothing deleted
        (base / "archive").unlink()
        coord.janitor()
        assert _rounds(c.store) == [3]
        assert sorted(p.name for p in (base / "archive" / "rollouts").iterdir()) == ["round_0", "round_1", "round_2"]
    finally:
        c.close()


# ---- the round clock: core's round rule on real registrations ----------------------------------------------
def test_the_keeper_advances_by_the_round_rule_on_real_registrations(tmp_path):
    """A quorum of the trainers that play along ends a round; round_deadline counts from the first node that
    finished the round, not from when the clock reached it. Driven by hand with explicit times."""
    url = str(tmp_path / "drive")
    c = comm(url, "coord", role="coordinator")
    keeper = FolderCoordinator(c, role="coordinator", deadline=60)
    keeper.close()  # drive it by hand
    w1, w2 = FolderCoordinator(comm(url, "w1")), FolderCoordinator(comm(url, "w2"))
    nodes = [c, w1.comm, w2.comm]
    t = time.time()

    def play(round):
        for node in nodes[:3]:
            node.publish(round, 0, [group()])

    try:
        play(0)
        assert until(lambda: {"w1", "w2"} <= set(c.live()))
        assert not keeper.step(now=t) and keeper.rule.first_done_at is None  # nobody finished round 0
        keeper.report_finished(0)
        w1.report_finished(0)
        assert until(lambda: c.live()["w1"].finished == 0)
        assert not keeper.step(now=t + 1) and keeper.clock == 0  # w2 plays round 0 and has not finished it
        w2.report_finished(0)
        assert until(lambda: keeper.step(now=t + 2)) and keeper.clock == 1
        assert c.store.read_clock()["round"] == 1 and w1.next_round(0) == 1

        # Round 1: a newcomer registers and has played nothing yet: it is not waited for.
        nodes.append(comm(url, "new"))
        play(1)
        assert until(lambda: "new" in c.live())
        for clock in (keeper, w1, w2):
            clock.report_finished(1)
        assert until(lambda: keeper.step(now=t + 3)) and keeper.clock == 2

        # Round 2: only w1 finishes it, long after the clock reached round 2.
        play(2)
        w1.report_finished(2)
        late = t + 1000
        assert until(lambda: not keeper.step(now=late) and keeper.rule.first_done_at == late)
        assert not keeper.step(now=late + 59.9) and keeper.clock == 2  # 60 s after w1 finished, not after round 2 began
        assert keeper.step(now=late + 60) and keeper.clock == 3 and keeper.rule.first_done_at is None
    finally:
        for node in nodes:
            node.close()


def test_the_keeper_ends_a_round_the_deadline_after_the_first_node_finished_it(tmp_path):
    """The keeper's own thread, with a tiny deadline: the clock has run longer than the deadline before
    anyone finishes, and still the round ends only `deadline` seconds after the first node finished it."""
    deadline = 0.5
    url = str(tmp_path / "drive")
    c = comm(url, "coord", role="coordinator")
    keeper = FolderCoordinator(c, role="coordinator", deadline=deadline)
    w = FolderCoordinator(comm(url, "w"))
    try:
        c.publish(0, 0, [group()])  # the keeper plays round 0 too, and never finishes it here
        w.comm.publish(0, 0, [group()])
        time.sleep(2 * deadline)  # at least this long since the clock started round 0
        reported = time.time()
        w.report_finished(0)
        assert until(lambda: keeper.clock == 1), "the deadline never ended round 0"
        advanced = c.store.read_clock()["updated"]
        assert advanced - reported >= deadline
        assert w.next_round(0) == 1
    finally:
        c.close()
        w.comm.close()


def test_a_follower_never_goes_back_when_the_clock_file_does(tmp_path):
    """(The jumps are supported by a live node's signed registration: tests/test_drive_clock_trust.py has the
    readings nothing supports.)"""
    c, ahead = comm(str(tmp_path), "w"), comm(str(tmp_path), "ahead")
    follower, store = FolderCoordinator(c), c.store
    try:
        assert follower.current() == 0  # no clock yet
        ahead.set_position(finished=4)
        store.write_clock({"round": 5})
        assert until(lambda: follower.current() == 5)
        store.write_clock({"round": 2})  # a stale replica, or a forged low clock
        assert follower.current() == 5 and follower.next_round(3) == 5 and follower.start_round(0) == 5
        store.write_atomic(store.state_path(), b"not json")
        assert follower.current() == 5
        ahead.set_position(finished=6)
        store.write_clock({"round": 7})
        assert until(lambda: follower.next_round(5) == 7)
    finally:
        c.close()
        ahead.close()


def test_drive_without_a_folder_fails_naming_the_setting(monkeypatch):
    from p2pswarm.settings import SettingsError, load_settings

    monkeypatch.delenv("GDRIVE_PATH", raising=False)
    with pytest.raises(SettingsError, match="drive_path"):
        load_settings(comm="drive")
    monkeypatch.setenv("GDRIVE_PATH", "/content/drive/MyDrive/rl-swarm")
    monkeypatch.setenv("NODE_ROLE", "coordinator")
    s = load_settings(comm="drive")
    assert (s.drive_path, s.role) == ("/content/drive/MyDrive/rl-swarm", "coordinator")

"""Drive mode: the swarm through a shared folder. Real processes on a real temporary folder, and the store's
parts in-process (memory:// and a temp folder). Every wait is bounded; every process started is killed."""

import json
import os
import time
from pathlib import Path

import pytest

from helpers import HANG, PROCESS_TEST_TIMEOUT, drive_clock, drive_cmd, events, kill_tree, metrics, wait_until
from p2pswarm import wire
from p2pswarm.comm.folder import FolderComm, FolderCoordinator, FolderStore
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
        skipped = [r for e in events(tmp_path, n) if e["kind"] == "rounds_skipped" for r in e["skipped"]]
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
        # a forged registration for alice is refused
        store.write_atomic(store.path("peers", "ghost.json"), b'{"peer_id": "12D3KooWx", "time": 1}')
        # and the honest file, arriving late, is still taken
        alice.publish(0, 0, [group()])
        assert len(mallory.collect(0, 0)) == 1
        c = mallory.counters()
        assert c["batches_received"] == 1 and c["dropped_bad_registration"] >= 1
        # read once: polling again does not re-read the file
        reads = c["files_read"]
        mallory.collect(0, 0)
        assert mallory.counters()["files_read"] == reads
    finally:
        alice.close()
        mallory.close()


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
            coord.next_round(r)  # as the round loop does after training: the clock moves on finished rounds
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
            again._write_clock(3)
        again.close()
        worker = FolderCoordinator(comm(url, "w"))
        assert worker.start_round(2) == 6 and worker.next_round(6) == 7 and worker.next_round(3) == 6
        worker.comm.close()
    finally:
        c.close()


def test_archive_failure_keeps_the_rounds(tmp_path):
    c = comm(str(tmp_path), "coord", role="coordinator")
    coord = FolderCoordinator(c, role="coordinator", keep_rounds=1, archive=True, deadline=1000)
    coord.close()  # drive it by hand
    try:
        for r in range(4):
            c.publish(r, 0, [group()])
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


def test_drive_without_a_folder_fails_naming_the_setting(monkeypatch):
    from p2pswarm.settings import SettingsError, load_settings

    monkeypatch.delenv("GDRIVE_PATH", raising=False)
    with pytest.raises(SettingsError, match="drive_path"):
        load_settings(comm="drive")
    monkeypatch.setenv("GDRIVE_PATH", "/content/drive/MyDrive/rl-swarm")
    monkeypatch.setenv("NODE_ROLE", "coordinator")
    s = load_settings(comm="drive")
    assert (s.drive_path, s.role) == ("/content/drive/MyDrive/rl-swarm", "coordinator")

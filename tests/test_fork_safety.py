"""A p2pswarm node in a folder the rl-swarm Drive fork (github Elrashid/rl-swarm) uses too: it deletes and
overwrites nothing it did not write, its clock file stays readable by the fork, the fork's clock paces it,
and a folder that is not there is an error for a worker.

The fork's files are written here by the test, shaped like those of the fork's example experiments
(`experiments/sapo_SmolLM_config2_4loc0ext` at its commit 22f3a85) and its writers (rgym_exp/src/gdrive_*):
nothing of the fork is imported or vendored; the few lines of its readers the test needs are re-implemented.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from helpers import ENDLESS, HANG, PROCESS_TEST_TIMEOUT, drive_cmd, events, metrics, node_cmd, run_process, wait_until
from p2pswarm.comm.drive.coordinator import FolderCoordinator
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.comm.drive.store import FolderMissing, FolderStore, NameTaken
from p2pswarm.identity import Identity
from p2pswarm.settings import load_settings
from p2pswarm.types import Group, Task

EXP = "sapo_fork_exp"
FORK_NODES = ("node_0", "node_1", "node_2")
T0 = 1763545486.68  # the fork example's registration time


# ---- the fork's files, as its writers lay them out ---------------------------------------------------------
def _write(path: Path, data: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))


def fork_state(base: Path, round: int, **extra) -> None:
    """current_state.json as the fork's coordinator's update_round_stage writes it: a temporary, then a rename."""
    tmp = base / "state" / "current_state.json.tmp"
    _write(tmp, {"round": round, "stage": 0, "updated_at": time.time(), "updated_by": "coordinator", **extra})
    os.replace(tmp, base / "state" / "current_state.json")


def fork_experiment(root: Path, rounds: int, name: str = EXP) -> Path:
    """A fork experiment that has played `rounds` rounds: its clock at `rounds`, and for each round its
    rollouts, rewards and winners, plus its registrations, logs, progress files, config and a checkpoint."""
    base = root / "experiments" / name
    for d in ("state", "peers", "rewards", "winners", "checkpoints", "logs"):  # its _init_directories
        (base / d).mkdir(parents=True, exist_ok=True)
    fork_state(base, rounds)
    _write(base / "config.yaml", "training.max_round: 50\ntraining.num_generations: 8\ntraining.num_train_samples: 4\n")
    for i, node in enumerate(FORK_NODES):
        _write(base / "peers" / f"{node}.json",
               {"peer_id": node, "registered_at": T0 + i, "node_role": "coordinator" if i == 0 else "worker"})
        _write(base / f"progress_{node}.json", json.dumps({"timestamp": T0, "elapsed_seconds": 2e-06, "event":
                                                          "training_started", "node_id": node, "experiment": name}) + "\n")
        _write(base / "logs" / node / "metrics.jsonl", "".join(
            json.dumps({"timestamp": T0 + r, "round": r, "stage": 0, "node_id": node, "experiment": name,
                        "my_reward": 0.1 * r}) + "\n" for r in range(rounds)))
        _write(base / "logs" / node / "training_events.jsonl",
               json.dumps({"timestamp": T0, "event": "training_started", "node_id": node}) + "\n")
        for r in range(rounds):
            _write(base / "rollouts" / f"round_{r}" / "stage_0" / f"{node}.json",
                   {"peer_id": node, "round": r, "stage": 0, "timestamp": T0 + r, "publish_frequency": "stage",
                    "rollouts": {"3036709544": [{"world_state": {"environment_states": {"question": "1+1?",
                                                                                         "answer": "2"}}}]}})
            _write(base / "rewards" / f"round_{r}" / "stage_0" / f"{node}.json",
                   {"round": r, "stage": 0, "reward": 0.08, "peer_id": node, "submitted_at": T0 + r})
            _write(base / "winners" / f"round_{r}" / f"{node}.json",
                   {"round": r, "winners": [node], "peer_id": node, "submitted_at": T0 + r})
    (base / "checkpoints" / "round_2").mkdir(parents=True)
    (base / "checkpoints" / "round_2" / "node_1.pt").write_bytes(b"\x80\x02fork checkpoint bytes")
    return base


def snapshot(base: Path) -> dict[str, bytes]:
    """Every file under `base` (relative path -> bytes)."""
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def fork_reads_state(base: Path) -> dict:
    """What the fork's readers take from current_state.json: its workers' get_round_and_stage and its
    get_experiment_status / list_experiments (rgym_exp/src/gdrive_coordinator.py, rgym_exp/utils/experiment_manager.py)."""
    with open(base / "state" / "current_state.json") as f:
        state = json.load(f)
    return {"round": state.get("round", 0), "stage": state.get("stage", 0),
            "last_updated": state.get("updated_at", 0), "created_at": state.get("created_at")}


def group(r: int = 0) -> Group:
    return Group(Task(f"t{r}", "d", "q", "a"), ["x", "y"], "p", [1.0, 0.0])


def comm(url: str, name: str, **kw) -> FolderComm:
    return FolderComm(url, Identity.generate(), EXP, name=name, timeout=2.0, poll=0.02, peer_timeout=5.0, **kw)


def member(url: str, finished: int, peer_timeout: float = 5.0) -> FolderComm:
    """A live node of ours that finished round `finished` (its signed registration, refreshed by its heartbeat
    thread): what lets a coordinator adopt a clock file nobody signs (tests/test_drive_clock_trust.py)."""
    m = FolderComm(url, Identity.generate(), EXP, name="member", timeout=1.0, poll=0.02,
                   peer_timeout=peer_timeout)
    m.set_position(finished=finished)
    return m


def play(c: FolderComm, coord: FolderCoordinator, rounds: range) -> None:
    """The keeper publishes and finishes each round as the round loop does; the rule moves the clock."""
    for r in rounds:
        c.publish(r, 0, [group(r)])
        coord.report_finished(r)
        while coord.step():
            pass


# ---- retention ------------------------------------------------------------------------------------------------
def test_retention_is_the_forks_keep_everything_unless_cleanup_is_configured(monkeypatch):
    for name in ("P2PSWARM_KEEP_ROUNDS", "P2PSWARM_ROLLOUT_CLEANUP", "P2PSWARM_ARCHIVE_ROLLOUTS",
                 "ROLLOUT_CLEANUP_ENABLED", "ROLLOUT_KEEP_LAST_N_ROUNDS", "ROLLOUT_ARCHIVE_OLD"):
        monkeypatch.delenv(name, raising=False)

    def retention(**env: str):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            s = load_settings()
        return s.rollout_cleanup, s.keep_rounds, s.archive_rollouts

    assert retention() == (False, 0, False)
    assert retention(ROLLOUT_CLEANUP_ENABLED="True") == (True, 10, False)  # the fork's default of 10 rounds
    assert retention(ROLLOUT_CLEANUP_ENABLED="true", ROLLOUT_KEEP_LAST_N_ROUNDS="3", ROLLOUT_ARCHIVE_OLD="True") == (True, 3, True)
    assert retention(P2PSWARM_KEEP_ROUNDS="5", P2PSWARM_ARCHIVE_ROLLOUTS="1") == (True, 5, True)  # as before
    assert retention(ROLLOUT_CLEANUP_ENABLED="False", P2PSWARM_KEEP_ROUNDS="5") == (False, 0, False)  # off wins
    assert retention(ROLLOUT_KEEP_LAST_N_ROUNDS="4") == (True, 4, False)
    assert retention(ROLLOUT_CLEANUP_ENABLED="true", ROLLOUT_KEEP_LAST_N_ROUNDS="0") == (False, 0, False)  # 0 keeps all


@pytest.mark.parametrize("archive", [False, True])
def test_cleanup_retires_only_the_rollout_files_the_setting_names(tmp_path, archive, caplog):
    """With cleanup on (keep 2), a coordinator adopting a fork experiment at round 5 and playing to round 8
    retires rounds 0-5 of rollouts, the fork's `.json` files and its own `.msgpack` ones; a file or folder it
    does not know in a retired round stays, and so does everything outside rollouts/, byte for byte. An
    archived file never replaces one already in the archive."""
    base = fork_experiment(tmp_path, 5)
    r1 = base / "rollouts" / "round_1"
    _write(r1 / "notes.txt", "someone's notes")
    _write(r1 / "stage_0" / ".node_2.json.tmp", "a fork write in flight")
    _write(r1 / "stage_0" / "node 9.json", "a name the fork may write, ours never")
    _write(r1 / "plots" / "p.json", "{}")
    _write(base / "archive" / "rollouts" / "round_0" / "stage_0" / "node_0.json", "archived before")
    before = snapshot(base)
    m = member(str(tmp_path), 4)  # one of ours played along with the fork up to round 4, then leaves
    c = comm(str(tmp_path), "coord", role="coordinator")
    coord = FolderCoordinator(c, role="coordinator", keep_rounds=2, archive=archive, deadline=1000)
    coord.close()  # driven by hand
    m.close()
    try:
        assert coord.clock == 5
        play(c, coord, range(5, 8))
        assert coord.clock == 8
        with caplog.at_level(logging.INFO, logger="p2pswarm.comm.drive.coordinator"):
            coord.janitor()
    finally:
        c.close()
    after = {k: v for k, v in snapshot(base).items() if not k.startswith("peers/member.")}
    unknown = {"rollouts/round_1/notes.txt", "rollouts/round_1/stage_0/.node_2.json.tmp",
               "rollouts/round_1/stage_0/node 9.json", "rollouts/round_1/plots/p.json"}
    # The archive already holds round 0's node_0.json: that one file stays where it is when archiving.
    blocked = {"rollouts/round_0/stage_0/node_0.json"} if archive else set()
    retired = {k for k in before if k.startswith("rollouts/") and k not in unknown | blocked}  # the fork's rounds 0-4
    retired.add("rollouts/round_5/stage_0/coord.msgpack")
    ours = {f"rollouts/round_{r}/stage_0/coord.msgpack" for r in (6, 7)}
    assert {k for k in after if k.startswith("rollouts/")} == unknown | blocked | ours
    assert sorted(p.name for p in (base / "rollouts").iterdir()) == (["round_0"] if archive else []) + [
        "round_1", "round_6", "round_7"]  # emptied folders go, a folder with anything left in it stays
    for k, v in before.items():  # everything else the fork wrote is there as it was
        if k not in retired and k != "state/current_state.json":
            assert after[k] == v, k
    if archive:
        assert after["archive/rollouts/round_0/stage_0/node_0.json"] == b"archived before"
        assert {k for k in after if k.startswith("archive/")} == {"archive/" + k for k in retired} | {
            "archive/rollouts/round_0/stage_0/node_0.json"}
        for k in retired - {"rollouts/round_5/stage_0/coord.msgpack"}:
            assert after["archive/" + k] == before[k], k
    else:
        assert {k for k in after if k.startswith("archive/")} == {"archive/rollouts/round_0/stage_0/node_0.json"}
    assert any("retired round(s) 0-5" in r.getMessage() for r in caplog.records), caplog.text


# ---- the clock file ---------------------------------------------------------------------------------------------
def test_our_clock_file_keeps_the_forks_fields_and_reads_as_the_fork_reads_it(tmp_path, caplog):
    """A fork experiment created by the fork's init_experiment (created_at, experiment_name, config_overrides):
    our coordinator adopts its round and every rewrite keeps those fields and adds what the fork's readers use."""
    base = fork_experiment(tmp_path, 3)
    created = time.time() - 3600
    fork_state(base, 3, created_at=created, experiment_name=EXP, config_overrides={"num_generations": 8})
    m = member(str(tmp_path), 2)
    c = comm(str(tmp_path), "coord", role="coordinator")
    with caplog.at_level(logging.INFO, logger="p2pswarm.comm.drive.coordinator"):
        coord = FolderCoordinator(c, role="coordinator", deadline=1000)
    coord.close()
    m.close()
    try:
        assert coord.clock == 3
        assert any("round clock adopted at round 3" in r.getMessage() for r in caplog.records), caplog.text
        play(c, coord, range(3, 5))
        state = json.loads((base / "state" / "current_state.json").read_text())
        assert fork_reads_state(base) == {"round": 5, "stage": 0, "last_updated": state["updated"], "created_at": created}
        assert time.time() - state["updated_at"] < 600 and state["updated_by"] == "coord"
        assert (state["experiment_name"], state["config_overrides"]) == (EXP, {"num_generations": 8})
        assert c.store.read_clock()["coordinator_name"] == "coord"
    finally:
        c.close()


def test_hostile_fork_fields_in_the_clock_file_are_not_carried_over(tmp_path):
    base = fork_experiment(tmp_path, 2)
    fork_state(base, 2, created_at="yesterday", experiment_name="a" * 5000, config_overrides={"x": "y" * 70_000})
    m = member(str(tmp_path), 1)
    c = comm(str(tmp_path), "coord", role="coordinator")
    coord = FolderCoordinator(c, role="coordinator", deadline=1000)
    coord.close()
    m.close()
    try:
        play(c, coord, range(2, 3))
        state = json.loads((base / "state" / "current_state.json").read_text())
        assert state["round"] == 3 and "experiment_name" not in state and "config_overrides" not in state
        assert isinstance(state["created_at"], float)
    finally:
        c.close()


def test_a_clock_file_with_no_round_is_set_aside_not_overwritten(tmp_path):
    base = tmp_path / "experiments" / EXP
    _write(base / "state" / "current_state.json", '{"stage": 0, "note": "not ours"}')
    c = comm(str(tmp_path), "coord", role="coordinator")
    coord = FolderCoordinator(c, role="coordinator", deadline=1000)
    coord.close()
    try:
        aside = list((base / "state").glob("current_state.json.unreadable-*"))
        assert len(aside) == 1 and aside[0].read_text() == '{"stage": 0, "note": "not ours"}'
        assert c.store.read_clock()["round"] == 0
    finally:
        c.close()


def test_the_forks_clock_file_reads_as_our_clock(tmp_path):
    base = fork_experiment(tmp_path, 7)
    clock = FolderStore(str(tmp_path), EXP).read_clock()
    written = json.loads((base / "state" / "current_state.json").read_text())
    assert clock == {"round": 7, "stage": 0, "started": written["updated_at"], "updated": written["updated_at"],
                     "coordinator": None, "coordinator_name": "coordinator"}


# ---- the folder and the node's name -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["tmp", "memory"])
def test_only_a_coordinator_creates_a_missing_shared_folder(tmp_path, where, caplog):
    url = str(tmp_path / "typo") if where == "tmp" else f"memory://fork-safety-{os.getpid()}/typo"
    store = FolderStore(url, EXP)
    with pytest.raises(FolderMissing, match=f"the shared folder {url} does not exist"):
        store.open_folder(coordinator=False)
    assert not store.fs.exists(store.root)
    with caplog.at_level(logging.INFO, logger="p2pswarm.comm.drive.store"):
        store.open_folder(coordinator=True)
    assert store.fs.isdir(store.root)
    assert [r.getMessage() for r in caplog.records] == [f"created the shared folder {url} (it did not exist) for experiment {EXP}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="p2pswarm.comm.drive.store"):
        store.open_folder(coordinator=False)  # there now: a worker goes on, saying its experiment is not there yet
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and EXP in caplog.text


def test_a_node_name_the_fork_or_another_node_holds_is_refused(tmp_path):
    fork_experiment(tmp_path, 1)
    store = FolderStore(str(tmp_path), EXP)
    me = Identity.generate()
    with pytest.raises(NameTaken, match="node name 'node_1' is taken"):
        store.claim_name("node_1", me.peer_id)  # the fork's unsigned registration
    _write(tmp_path / "experiments" / EXP / "logs" / "lone" / "metrics.jsonl", "{}\n")
    with pytest.raises(NameTaken, match="logs/lone"):
        store.claim_name("lone", me.peer_id)
    store.claim_name("fresh", me.peer_id)  # free
    c = FolderComm(str(tmp_path), me, EXP, name="mine", timeout=1.0, poll=0.02, peer_timeout=5.0)
    c.close()
    store.claim_name("mine", me.peer_id)  # its own registration, signed by its key: a restart
    with pytest.raises(NameTaken, match="the registration of"):
        store.claim_name("mine", Identity.generate().peer_id)


# ---- real nodes -------------------------------------------------------------------------------------------------
def fork_node_cmd(tmp_path: Path, name: str, role: str, rounds: int, *settings: str) -> list[str]:
    return drive_cmd(tmp_path, tmp_path / "runs" / name, name, role, rounds, "collect_timeout=1", "round_deadline=2",
                     "checkpoint_every=2", *settings, experiment=EXP)


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_a_coordinator_in_a_fork_experiment_deletes_and_overwrites_nothing(tmp_path, procs):
    """Our coordinator started (default settings) in a fork experiment at round 5 adopts the round, plays
    rounds 5-8 and stops; every file the fork wrote is there byte for byte, but the clock file, which the
    fork's readers read at the round we reached."""
    base = fork_experiment(tmp_path, 5)
    before = snapshot(base)
    m = member(str(tmp_path), 4, peer_timeout=4.0)  # what lets it adopt the fork's unsigned clock; it leaves then
    try:
        procs.start("coord", fork_node_cmd(tmp_path, "coord", "coordinator", 9))
        procs.wait_for("coord", "round clock adopted at round 5", HANG)
    finally:
        m.close()
    procs.wait_exit("coord", HANG)
    assert [r["round"] for r in metrics(tmp_path / "runs" / "coord")] == [5, 6, 7, 8]
    after = snapshot(base)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert changed == ["state/current_state.json"], changed
    assert fork_reads_state(base)["round"] >= 8
    assert fork_reads_state(base)["last_updated"] > json.loads(before["state/current_state.json"])["updated_at"]
    assert (base / "rollouts" / "round_8" / "stage_0" / "coord.msgpack").exists()  # and ours beside them


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_a_coordinator_with_the_forks_cleanup_variables_retires_only_old_rollouts(tmp_path, procs):
    """The fork's ROLLOUT_CLEANUP_ENABLED / ROLLOUT_KEEP_LAST_N_ROUNDS in the environment: the fork's rollouts
    of rounds 0-4 go once the clock passes round 6; every other file of the fork's stays byte for byte."""
    base = fork_experiment(tmp_path, 5)
    before = snapshot(base)
    env = {**os.environ, "ROLLOUT_CLEANUP_ENABLED": "True", "ROLLOUT_KEEP_LAST_N_ROUNDS": "2"}
    m = member(str(tmp_path), 4, peer_timeout=4.0)
    try:
        procs.start("coord", fork_node_cmd(tmp_path, "coord", "coordinator", 9), env=env)
        procs.wait_for("coord", "round clock adopted at round 5", HANG)
    finally:
        m.close()
    procs.wait_exit("coord", HANG)
    after = snapshot(base)
    assert not (base / "rollouts" / "round_4").exists() and (base / "rollouts" / "round_8").exists()
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert changed == sorted([k for k in before if k.startswith("rollouts/")] + ["state/current_state.json"]), changed
    assert "retired round(s) 0-" in procs.log("coord")


def fork_live(base: Path, node: str, submitted: int) -> None:
    """The fork node `node` registered now and its reward submission for round `submitted` (written once it
    collected that round): with drive_trust_folder on, the finished round our clock's plausibility counts."""
    _write(base / "peers" / f"{node}.json", {"peer_id": node, "registered_at": time.time(), "node_role": "coordinator"})
    _write(base / "rewards" / f"round_{submitted}" / "stage_0" / f"{node}.json",
           {"round": submitted, "stage": 0, "reward": 0.1, "peer_id": node, "submitted_at": time.time()})


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_the_forks_clock_paces_our_worker(tmp_path, procs):
    """With drive_trust_folder on, a fork coordinator's current_state.json (round, stage, updated_at, updated_by)
    is the clock of our worker as far as the fork nodes' reward submissions show the rounds they finished: it
    starts at the fork's round and jumps when the fork's coordinator moves on. The file is unsigned, so a jump
    no live node's progress supports is ignored (counted, logged once) and the worker plays on at its own pace."""
    base = fork_experiment(tmp_path, 4)
    fork_live(base, "node_0", 3)
    procs.start("w", fork_node_cmd(tmp_path, "w", "worker", ENDLESS, "drive_trust_folder=true"))
    wait_until(lambda: metrics(tmp_path / "runs" / "w"), HANG, "the worker's first round", lambda: procs.log("w"))
    assert metrics(tmp_path / "runs" / "w")[0]["round"] == 4
    fork_state(base, 1000)  # nobody finished anything near round 999: not a clock to follow
    procs.wait_for("w", r"holds round 1000, more than 2 round\(s\) past", HANG)
    played = len(metrics(tmp_path / "runs" / "w"))
    wait_until(lambda: len(metrics(tmp_path / "runs" / "w")) >= played + 2, HANG, "two more rounds", lambda: procs.log("w"))
    assert all(r["round"] < 1000 for r in metrics(tmp_path / "runs" / "w"))
    fork_live(base, "node_0", 999)  # the fork's nodes played on to round 999: now the clock is plausible
    fork_state(base, 1000)
    wait_until(lambda: any(r["round"] >= 1000 for r in metrics(tmp_path / "runs" / "w")), HANG,
               "the worker at the fork's round 1000", lambda: procs.log("w"))
    procs.stop("w")
    rows = metrics(tmp_path / "runs" / "w")
    rounds = [r["round"] for r in rows]
    assert rounds[0] == 4 and rounds == sorted(set(rounds)) and 1000 in rounds, rounds
    assert rows[-1]["comm"]["dropped_implausible_clock"] >= 1
    assert procs.log("w").count("holds round 1000") == 1  # once, however often it was read
    skipped = [(e["first"], e["last"], e["count"]) for e in events(tmp_path / "runs" / "w")
               if e.get("kind") == "rounds_skipped"]
    assert skipped[0] == (0, 3, 4) and any(last == 999 for _, last, _ in skipped), skipped


def test_a_worker_with_a_missing_folder_exits_with_one_error_naming_it(tmp_path):
    typo = tmp_path / "MyDrive" / "rl-swarn"
    res = run_process(node_cmd(tmp_path / "runs" / "w", "w", 2, "--comm", "drive", "--drive-path", str(typo),
                               "--role", "worker", experiment=EXP), HANG)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and str(typo) in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not typo.exists() and not typo.parent.exists()

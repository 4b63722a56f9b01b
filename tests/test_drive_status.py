"""Drive mode, what a user looks at and relies on: logs and checkpoints in the shared folder, resuming from
them after the run folder is lost, `p2pswarm status` / `report`, get_experiment_status / _metrics, and the
Colab notebook. One real swarm (a coordinator and two workers as processes on a temporary folder) serves
most tests; every wait is bounded and every process started is killed."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import HANG, PROCESS_TEST_TIMEOUT, ROOT, Procs, cli, drive_clock, drive_cmd, jsonl, run_process
from p2pswarm.apps.cli import app

EXP = "drive-status"
ROUNDS = 8
NAMES = ("coord", "w1", "w2")
pytestmark = pytest.mark.timeout(PROCESS_TEST_TIMEOUT)  # the first test to use `swarm` runs it


def node_cmd(base: Path, drive: Path, name: str, role: str, rounds: int, *settings: str) -> list[str]:
    return drive_cmd(drive, base / "runs" / EXP / name, name, role, rounds, "round_deadline=30", "checkpoint_every=3",
                     "keep_checkpoints=2", *settings, experiment=EXP, extra=("--identity", str(base / "keys" / f"{name}.key")))


def clock(drive: Path) -> int:
    return drive_clock(drive, EXP)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A coordinator and two workers play ROUNDS rounds through a temp folder; while they run, `p2pswarm
    status --json` (GDRIVE_PATH / EXPERIMENT_NAME from the environment) is taken once all three are live.
    Module-scoped: the swarm runs once and most tests below inspect what it left, so one root cause (a node
    that failed, a wait that ran out here) shows up as several failures: read the first one's log tail.
    Each node waits for both others' batches every round, so all three play every round together however
    unevenly they start on a busy machine."""
    from p2pswarm.analysis import get_experiment_status

    base = tmp_path_factory.mktemp("swarm")
    drive = base / "drive"
    procs = Procs(base)
    try:
        for n in NAMES:
            procs.start(n, node_cmd(base, drive, n, "coordinator" if n == "coord" else "worker", ROUNDS,
                                    "collect_peers=2", "collect_timeout=240"))
        live, before, after = None, -1, -1
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.procs.values()):
            try:
                st = get_experiment_status(str(drive), EXP, peer_timeout=4)
            except FileNotFoundError:
                st = None
            if (st and st["num_active_peers"] == 3 and all(p["rounds_done"] >= 1 for p in st["peers"])
                    and clock(drive) >= 1):  # the clock moves once the coordinator sees the round finished
                before = clock(drive)
                res = CliRunner().invoke(app, ["status", "--json", "--peer-timeout", "4"],
                                         env={"GDRIVE_PATH": str(drive), "EXPERIMENT_NAME": EXP})
                after = clock(drive)
                assert res.exit_code == 0, res.output
                live = json.loads(res.stdout)
                if all(p["state"] == "live" for p in live["peers"]):
                    break  # else a heartbeat went stale between the two reads on a busy machine: look again
            time.sleep(0.2)
        for n in NAMES:
            procs.wait_exit(n, HANG)
    finally:
        procs.kill_all()
    peer_ids = {n: json.loads((drive / "experiments" / EXP / "peers" / f"{n}.json").read_text())["peer_id"] for n in NAMES}
    return {"base": base, "drive": drive, "live": live, "clock_before": before, "clock_after": after, "peer_ids": peer_ids}


def local(swarm, name: str) -> Path:
    return swarm["base"] / "runs" / EXP / name


def shared(swarm, *parts: str) -> Path:
    return swarm["drive"].joinpath("experiments", EXP, *parts)


# ---- status ---------------------------------------------------------------------------------------------
def test_status_while_the_swarm_runs_shows_the_live_peers_and_the_round(swarm):
    live = swarm["live"]
    assert live is not None, "status never saw the three nodes live"
    assert live["experiment_name"] == EXP
    assert live["num_active_peers"] == live["active_peers"] == 3 and live["peer_ids"] == sorted(NAMES)
    assert 1 <= swarm["clock_before"] <= live["current_round"] <= swarm["clock_after"]
    assert live["current_stage"] == 0 and live["coordinator"] == "coord"
    for p in live["peers"]:
        assert p["state"] == "live" and 0 <= p["heartbeat_age_s"] <= 4
        assert p["peer_id"] == swarm["peer_ids"][p["node"]]
        assert p["role"] == ("coordinator" if p["node"] == "coord" else "worker")
        assert p["rounds_done"] >= 1 and 0.0 <= p["reward_recent"] <= 1.0  # logs mirrored while running


def test_status_after_the_run_prints_each_peer_with_its_round_and_rewards(swarm):
    res = CliRunner().invoke(app, ["status", "--drive-path", str(swarm["drive"]), "--experiment", EXP])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert f"round {clock(swarm['drive'])}, stage 0" in out and "0 live peer(s) of 3" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("node "))
    for col in ("role", "state", "heartbeat", "round", "rounds", "reward(last 10)", "checkpoint"):
        assert col in header
    for n in NAMES:
        row = next(line for line in lines if line.startswith(n + " ")).split()
        rows = jsonl(local(swarm, n) / "metrics.jsonl")
        rewards = [r["reward_local_mean"] for r in rows]
        assert row[1] == ("coordinator" if n == "coord" else "worker") and row[2] == "left"
        assert row[4] == str(rows[-1]["round"]) and row[6] == str(len(rows))  # last round published, rounds done
        assert row[7] == f"{sum(rewards[-10:]) / len(rewards[-10:]):.3f}" and row[8] == f"{rewards[-1]:.3f}"
        assert row[9] == str(rows[-1]["round"])  # the final checkpoint is in the shared folder


# ---- logs and checkpoints in the shared folder ------------------------------------------------------------
def test_logs_and_checkpoints_are_mirrored_into_the_shared_folder(swarm):
    from p2pswarm.comm.drive.mirror import _sha256
    from p2pswarm.comm.drive.records import check_record

    for n in NAMES:
        # complete: the last events (node stopped) included
        assert shared(swarm, "logs", n, "events.jsonl").read_bytes() == (local(swarm, n) / "events.jsonl").read_bytes()
        rows, theirs = jsonl(local(swarm, n) / "metrics.jsonl"), jsonl(shared(swarm, "logs", n, "metrics.jsonl"))
        assert [{k: t[k] for k in r} for r, t in zip(rows, theirs)] == rows and len(theirs) == len(rows)  # + the fork's fields
        mine = sorted(p.name for p in (local(swarm, n) / "checkpoints").iterdir())
        theirs = sorted(p.name for p in shared(swarm, "checkpoints", n).iterdir())
        last = jsonl(local(swarm, n) / "metrics.jsonl")[-1]["round"]
        assert mine == theirs and 1 <= len(theirs) <= 2 and theirs[-1] == f"round_{last:06d}"  # keep_checkpoints=2
        for name in theirs:
            folder = shared(swarm, "checkpoints", n, name)
            manifest = check_record(json.loads((folder / "manifest.json").read_text()))
            assert manifest is not None and manifest["peer_id"] == swarm["peer_ids"][n]
            assert {"state.json", "trainer.pt", "model/model.safetensors"} <= set(manifest["files"])
            for rel, meta in manifest["files"].items():
                assert _sha256(folder / rel) == meta["sha256"]
                assert (folder / rel).read_bytes() == (local(swarm, n) / "checkpoints" / name / rel).read_bytes()
    assert not [p for p in shared(swarm).rglob("*") if p.name.startswith(".")]  # no temporaries left


# ---- the Python functions ---------------------------------------------------------------------------------
def test_get_experiment_metrics_has_one_row_per_node_per_round(swarm):
    from p2pswarm import get_experiment_metrics, get_experiment_status

    df = get_experiment_metrics(str(swarm["drive"]), EXP)
    assert not df.duplicated(["node", "round"]).any() and sorted(df["node"].unique()) == sorted(NAMES)
    total = 0
    for n in NAMES:
        rows = jsonl(local(swarm, n) / "metrics.jsonl")
        total += len(rows)
        mine = df[df["node"] == n]
        # every round the node played (a node that starts late jumps to the swarm's round), in order
        assert list(mine["round"]) == [r["round"] for r in rows] and len(rows) >= ROUNDS // 2
        assert list(mine["my_reward"]) == [r["reward_local_mean"] for r in rows]
        assert (mine["node_id"] == n).all() and (mine["peer"] == swarm["peer_ids"][n]).all()
        assert (mine["swarm_groups_received"] > 0).any()  # they did learn from each other
    assert len(df) == total
    assert {"reward_mean", "loss", "timestamp", "comm.batches_sent"} <= set(df.columns)
    st = get_experiment_status(str(swarm["drive"]), EXP)
    assert st["current_round"] == clock(swarm["drive"]) and st["total_metric_entries"] == len(df)
    assert st["latest_checkpoint"] == df["round"].max() and st["num_active_peers"] == 0


# ---- report -------------------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_writes_a_png_from_the_shared_folder_and_from_run_folders(swarm, tmp_path):
    out = tmp_path / "plots" / "drive.png"
    res = run_process(cli("report", "--drive-path", str(swarm["drive"]), "--experiment", EXP, "--out", str(out)),
                      timeout=HANG)
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout and "3 node(s)" in res.stdout and f"-{ROUNDS - 1})" in res.stdout
    assert out.stat().st_size > 10_000 and min(png_size(out)) >= 300
    res = CliRunner().invoke(app, ["report", "--runs-dir", str(swarm["base"] / "runs"), "--experiment", EXP,
                                   "--out", str(tmp_path / "runs.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs.png").stat().st_size > 10_000 and min(png_size(tmp_path / "runs.png")) >= 300


# ---- resume from the shared folder --------------------------------------------------------------------------
def test_a_node_that_lost_its_run_folder_resumes_from_the_shared_checkpoint(swarm, tmp_path):
    """The Colab case: the VM died with its disk. Same identity (kept elsewhere), empty run folder: the node
    takes its checkpoint and logs back from the shared folder and continues; no round is replayed or lost."""
    drive = tmp_path / "drive"
    shutil.copytree(swarm["drive"], drive)
    shutil.copytree(swarm["base"] / "keys", tmp_path / "keys")
    run = tmp_path / "runs" / EXP / "w1"
    assert not run.exists()
    before = [r["round"] for r in jsonl(drive / "experiments" / EXP / "logs" / "w1" / "metrics.jsonl")]
    last, clock_then = before[-1], clock(drive)  # w1's final checkpoint is its last round played
    res = run_process(node_cmd(tmp_path, drive, "w1", "worker", ROUNDS + 2, "collect_peers=0", "collect_timeout=2"),
                      timeout=HANG)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"restored the checkpoint of round {last}" in res.stdout
    events = jsonl(run / "events.jsonl")
    restart = max(i for i, e in enumerate(events) if e["kind"] == "node_started")
    after = events[restart - 1:]
    assert after[0]["kind"] == "resumed" and after[0]["round"] == last
    played = [e["round"] for e in after if e["kind"] == "round_started"]
    assert played == list(range(max(last + 1, clock_then), ROUNDS + 2))  # no rewind, no round played twice
    rows = [r["round"] for r in jsonl(run / "metrics.jsonl")]
    assert rows == before + played  # the history came back from the shared folder, then the new rounds
    logs = drive / "experiments" / EXP / "logs" / "w1"
    assert [r["round"] for r in jsonl(logs / "metrics.jsonl")] == rows
    shared_ckpts = sorted(p.name for p in (drive / "experiments" / EXP / "checkpoints" / "w1").iterdir())
    assert shared_ckpts == sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(shared_ckpts) == 2 and shared_ckpts[-1] == f"round_{ROUNDS + 1:06d}"


@pytest.mark.parametrize("where", ["memory", "folder"])
def test_a_shared_checkpoint_is_restored_only_if_this_node_signed_it_and_it_is_intact(where, tmp_path):
    """trainer.pt is a pickle: a checkpoint someone else planted or changed must never be loaded."""
    from p2pswarm.comm.drive.mirror import DriveMirror
    from p2pswarm.comm.drive.store import FolderStore
    from p2pswarm.identity import Identity
    from p2pswarm.run import RunDir

    class Trainer:
        def save(self, path):
            (path / "model").mkdir()
            (path / "model" / "weights.bin").write_bytes(os.urandom(4096))
            (path / "trainer.pt").write_bytes(b"optimizer")

    store = FolderStore(f"memory://restore-{os.getpid()}" if where == "memory" else str(tmp_path / "drive"), EXP)
    me = Identity.generate()
    src = RunDir(tmp_path / "first")
    mirror = DriveMirror(store, me, "n1", src, keep=2)
    try:
        for r in range(3):
            assert mirror.upload_checkpoint(r, src.save_checkpoint(r, Trainer(), keep=3))
    finally:
        mirror.close()
    ckpts = f"{store.path('checkpoints', 'n1')}"
    assert sorted(store.subfolders(ckpts)) == ["round_000001", "round_000002"]

    def restore(identity, name):
        m = DriveMirror(store, identity, "n1", RunDir(tmp_path / name), keep=2)
        try:
            return m.restore(), m.run.checkpoint_rounds()
        finally:
            m.close()

    assert restore(Identity.generate(), "stranger") == (None, [])  # signed by another peer
    store.fs.pipe_file(f"{ckpts}/round_000002/trainer.pt", b"import os; os.system('echo pwned')")
    assert restore(me, "tampered") == (1, [1])  # the changed round is refused, the older intact one taken
    assert (tmp_path / "tampered" / "checkpoints" / "round_000001" / "model" / "weights.bin").read_bytes() == \
        (src.checkpoint_path(1) / "model" / "weights.bin").read_bytes()
    ahead = RunDir(tmp_path / "ahead")
    ahead.save_checkpoint(5, Trainer(), keep=3)
    m = DriveMirror(store, me, "n1", ahead, keep=2)
    try:
        assert m.restore() is None and ahead.checkpoint_rounds() == [5]  # a newer local checkpoint wins
    finally:
        m.close()


def test_a_restore_copies_no_more_than_the_manifest_says_and_adopts_only_logs_this_node_signed(tmp_path):
    """A folder writer can swap a huge file in for a checkpoint file, or add rows in a node's name to its logs:
    the first is refused as soon as it runs past its signed size, the second leaves the logs unrestored."""
    import json as _json

    from p2pswarm.comm.drive.mirror import LOGS_MANIFEST, DriveMirror
    from p2pswarm.comm.drive.store import FolderStore
    from p2pswarm.identity import Identity
    from p2pswarm.run import RunDir

    class Trainer:
        def save(self, path):
            (path / "trainer.pt").write_bytes(b"optimizer")

    store = FolderStore(str(tmp_path / "drive"), EXP)
    me = Identity.generate()
    src = RunDir(tmp_path / "first")
    for r in range(2):
        src.append_metrics({"round": r, "peer": me.peer_id, "reward": 0.5})
    (src.path / "events.jsonl").write_text(_json.dumps({"kind": "round_finished", "round": 1, "peer": me.peer_id}) + "\n")
    mirror = DriveMirror(store, me, "n1", src, keep=3)
    try:
        assert mirror.upload_checkpoint(0, src.save_checkpoint(0, Trainer(), keep=3))
        assert mirror.upload_checkpoint(1, src.save_checkpoint(1, Trainer(), keep=3))
        mirror.upload_logs()
    finally:
        mirror.close()
    logs = store.path("logs", "n1")
    assert store.fs.exists(f"{logs}/{LOGS_MANIFEST}")

    def restore(name):
        m = DriveMirror(store, me, "n1", RunDir(tmp_path / name), keep=3)
        try:
            return m.restore(), m.run
        finally:
            m.close()

    r, run = restore("intact")
    assert r == 1 and run.metrics_path.exists()  # the logs this node signed come back
    # a 64 MB file in place of round 1's 9-byte trainer.pt: refused, the older round restored
    ckpt = store.path("checkpoints", "n1")
    with store.fs.open(f"{ckpt}/round_000001/trainer.pt", "wb") as f:
        f.write(b"\0" * (64 << 20))
    r, run = restore("swapped")
    assert r == 0 and not any(p.stat().st_size > 1 << 20 for p in run.path.rglob("*") if p.is_file())
    # a row added in the node's name: the logs no longer match what it signed, and are not taken
    forged = _json.dumps({"round": 7, "peer": me.peer_id, "reward": 1.0}) + "\n"
    with store.fs.open(f"{logs}/events.jsonl", "ab") as f:
        f.write(forged.encode())
    r, run = restore("forged")
    events = run.path / "events.jsonl"
    assert r == 0 and (not events.exists() or '"round": 7' not in events.read_text())


# ---- errors, package, notebook ------------------------------------------------------------------------------
def test_status_of_a_missing_experiment_names_the_ones_that_exist(tmp_path):
    from p2pswarm import get_experiment_status
    from p2pswarm.analysis import ExperimentNotFound

    for name in ("alpha", "beta"):
        (tmp_path / "drive" / "experiments" / name / "peers").mkdir(parents=True)
    env = {**os.environ, "GDRIVE_PATH": str(tmp_path / "drive"), "EXPERIMENT_NAME": "nope"}
    res = run_process(cli("status"), timeout=HANG, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "no experiment 'nope'" in res.stderr and "alpha, beta" in res.stderr
    res = run_process(cli("status", "--drive-path", str(tmp_path / "unmounted"), "--experiment", "alpha"), timeout=HANG)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ExperimentNotFound) as e:
        get_experiment_status(str(tmp_path / "drive"), "nope")
    assert e.value.available == ["alpha", "beta"]
    empty = get_experiment_status(str(tmp_path / "drive"), "alpha")  # exists, nothing has run yet
    assert empty["current_round"] is None and empty["peers"] == [] and empty["num_active_peers"] == 0
    res = CliRunner().invoke(app, ["status", "--drive-path", str(tmp_path / "drive"), "--experiment", "alpha"])
    assert res.exit_code == 0 and "not started" in res.stdout and "no peers" in res.stdout


def test_importing_the_analysis_functions_does_not_load_pandas_or_torch():
    code = ("import sys; from p2pswarm import get_experiment_status, get_experiment_metrics; "
            "print(sorted(m for m in ('pandas', 'torch', 'matplotlib', 'transformers') if m in sys.modules))")
    res = run_process([sys.executable, "-c", code], timeout=HANG)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_the_colab_notebook_is_valid_and_runs_a_drive_worker():
    path = ROOT / "notebooks" / "drive_worker.ipynb"
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4 and nb["cells"]
    try:
        import nbformat
    except ImportError:
        nbformat = None
    if nbformat is not None:
        nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
    code = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], (list, str))
        src = "".join(cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            # shell (!) and magic (%) lines aside, every code cell is valid Python
            compile("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%"))),
                    "cell", "exec")
            code.append(src)
    text = "\n".join(code)
    for needed in ("drive.mount", "GDRIVE_PATH", "EXPERIMENT_NAME", "NODE_ROLE", "NODE_ID", "IDENTITY_PATH",
                   "pip install", "--comm", "drive", "--headless", "get_experiment_status", "get_experiment_metrics",
                   "p2pswarm report"):
        assert needed in text, needed

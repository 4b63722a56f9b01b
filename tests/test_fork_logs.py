"""The rl-swarm Google-Drive fork's monitoring files, both ways: `p2pswarm status` / `report` and
get_experiment_* on an experiment of the fork's nodes give the fork's own numbers, and the fork's readers
(re-implemented below in a few lines, after rgym_exp/utils/experiment_manager.py; the fork is not imported)
give real numbers on an experiment of ours.

The fork-format fixture is written by this test in the shapes of the fork's example experiment
(experiments/sapo_SmolLM_config2_4loc4ext at its commit 22f3a85) and of its writers (gdrive_logger.py,
manager.py, gdrive_coordinator.py, progress_tracker.py)."""

import json
import math
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import HANG, PROCESS_TEST_TIMEOUT, Procs, drive_cmd, jsonl
from p2pswarm.apps.cli import app

FORK_EXP = "sapo_fork_4loc4ext"
NODES = ("node_0", "node_1", "node_2", "node_3")  # node_0 keeps the clock (and trains, as in the fork's notebook)
ROUNDS = 5
CLOCK = 5


def reward_of(node: str, r: int) -> float:
    return float((int(node[-1]) + 1) * (r + 1))  # the fork's my_reward: the round's sum over its completions


def write_fork_experiment(root: Path, now: float) -> Path:
    """An experiment as the fork's nodes leave it: ROUNDS rounds played by NODES, node_3 done."""
    exp = root / "experiments" / FORK_EXP
    for d in ("state", "peers", "rewards", "winners", "checkpoints", "logs"):
        (exp / d).mkdir(parents=True, exist_ok=True)
    (exp / "config.yaml").write_text("training.max_round: 50\ntraining.num_train_samples: 4\n")
    (exp / "state" / "current_state.json").write_text(json.dumps(
        {"round": CLOCK, "stage": 0, "updated_at": now - 3, "updated_by": "coordinator"}, indent=2))
    for node in NODES:
        (exp / "peers" / f"{node}.json").write_text(json.dumps(
            {"peer_id": node, "registered_at": now - 900, "node_role": "coordinator" if node == "node_0" else "worker"},
            indent=2))
        log = exp / "logs" / node
        log.mkdir()
        rows, cumulative, total = [], [], 0.0
        for r in range(ROUNDS):
            t = now - 60 * (ROUNDS - r)
            my = reward_of(node, r)
            total += my
            base = {"round": r, "stage": 0, "node_id": node, "experiment": FORK_EXP}
            summary = {"timestamp": t, **base, "my_reward": my, "total_agents": 4, "peer_id": node, "mean_reward": my,
                       "std_reward": 0.0, "min_reward": 0.0, "max_reward": my, "median_reward": my, "my_rank": 1,
                       "percentile": 75.0}
            rows += [summary,  # _hook_after_rewards_updated: the summary, the cumulative row, the stage detail
                     {"timestamp": t + 0.1, **base, "cumulative_reward": total,
                      "average_reward_per_round": total / (r + 1), "is_cumulative_metric": True},
                     {"timestamp": t + 0.2, **base, "stage_reward": my, "num_samples": 32,
                      "avg_reward_per_sample": my / 32, "peer_id": node, "is_stage_detail": True},
                     {**summary, "timestamp": t + 0.3}]  # and run_game_round's second summary (its Drive mode)
            cumulative.append({"timestamp": t + 0.1, "round": r, "peer_id": node, "cumulative_reward": total,
                               "average_reward_per_round": total / (r + 1)})
            sub = exp / "rewards" / f"round_{r}" / "stage_0"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{node}.json").write_text(json.dumps(
                {"round": r, "stage": 0, "reward": my, "peer_id": node, "submitted_at": t}, indent=2))
            win = exp / "winners" / f"round_{r}"
            win.mkdir(parents=True, exist_ok=True)
            (win / f"{node}.json").write_text(json.dumps(
                {"round": r, "winners": [node], "peer_id": node, "submitted_at": t}, indent=2))
        (log / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        (log / "cumulative_metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in cumulative))
        progress = [{"timestamp": now - 900, "elapsed_seconds": 0.0, "event": "training_started", "node_id": node,
                     "experiment": FORK_EXP}]
        if node == "node_3":
            progress.append({"timestamp": now - 30, "elapsed_seconds": 870.0, "event": "training_complete",
                             "total_rounds": ROUNDS, "node_id": node, "total_elapsed_seconds": 870.0})
        (exp / f"progress_{node}.json").write_text("".join(json.dumps(x) + "\n" for x in progress))
    for r in (2, 4):  # GDriveLogger.log_checkpoint: checkpoints/round_R/<node>.pt
        (exp / "checkpoints" / f"round_{r}").mkdir()
        for node in ("node_1", "node_2"):
            (exp / "checkpoints" / f"round_{r}" / f"{node}.pt").write_bytes(b"PK\x03\x04 a torch zip")
    return exp


def damage(exp: Path) -> int:
    """What anyone with write access could leave: rows that must be dropped and counted, a forged signed peer."""
    bad = ['{"timestamp": 1, "round": 5, "my_reward": NaN, "node_id": "node_1"}',  # NaN, and a time before 2020
           '{"round": "5", "my_reward": 1.0, "node_id": "node_1"}',
           '{"round": 5, "my_reward": 1e300, "node_id": "node_1"}',
           '{"round": 5, "node_id": "node_1", "timestamp": 1e300}',
           '{"round": 5, "my_reward": 1.0, "node_id": "\\u0000"}',
           '[1, 2]',
           '{"round": 5, "my_re']  # a line cut short
    with open(exp / "logs" / "node_1" / "metrics.jsonl", "a") as f:
        f.write("\n".join(bad) + "\n")
    (exp / "peers" / "mallory.json").write_text(json.dumps(
        {"peer_id": "mallory", "registered_at": time.time(), "node_role": "worker", "sig": "00" * 64}))
    (exp / "peers" / "impostor.json").write_text(json.dumps(  # names another node than its file
        {"peer_id": "node_1", "registered_at": time.time(), "node_role": "worker"}))
    return len(bad)


# ---- our readers on the fork's files ------------------------------------------------------------------------
def test_status_of_a_fork_experiment_gives_the_forks_numbers(tmp_path):
    from p2pswarm import get_experiment_status

    now = time.time()
    exp = write_fork_experiment(tmp_path, now)
    bad = damage(exp)
    st = get_experiment_status(str(tmp_path), FORK_EXP)
    assert st["current_round"] == CLOCK and st["current_stage"] == 0 and st["last_updated"] == pytest.approx(now - 3)
    peers = {p["node"]: p for p in st["peers"]}
    assert set(peers) == set(NODES)
    assert all(p["kind"] == "fork" and p["peer_id"] is None for p in peers.values())
    assert st["peer_ids"] == ["node_0", "node_1", "node_2"] and st["num_active_peers"] == st["active_peers"] == 3
    assert peers["node_3"]["state"] == "left"  # its progress file says training_complete
    assert peers["node_0"]["role"] == "coordinator" and peers["node_1"]["role"] == "worker"
    assert st["invalid_peer_files"] == 2 and st["invalid_metric_rows"] == bad
    assert st["latest_checkpoint"] == 4
    assert peers["node_1"]["latest_checkpoint"] == 4 and peers["node_0"]["latest_checkpoint"] is None
    totals = {n: sum(reward_of(n, r) for r in range(ROUNDS)) for n in NODES}
    assert st["cumulative_rewards"] == totals and st["total_cumulative_reward"] == sum(totals.values())
    for n, p in peers.items():
        assert p["cumulative_reward"] == totals[n] and p["rounds_done"] == ROUNDS and p["round"] == ROUNDS - 1
        assert p["reward_last"] == reward_of(n, ROUNDS - 1)
        assert p["reward_recent"] == pytest.approx(totals[n] / ROUNDS)
    assert st["total_metric_entries"] == 4 * ROUNDS * len(NODES)

    res = CliRunner().invoke(app, ["status", "--drive-path", str(tmp_path), "--experiment", FORK_EXP])
    assert res.exit_code == 0, res.output
    assert f"round {CLOCK}, stage 0" in res.stdout and "3 live peer(s) of 4" in res.stdout
    assert "2 invalid peer file(s) ignored" in res.stdout and f"{bad} invalid metrics row(s) ignored" in res.stdout
    assert "4 rl-swarm fork node(s)" in res.stdout
    assert f"total cumulative reward {sum(totals.values()):.3f}" in res.stdout
    row = next(line for line in res.stdout.splitlines() if line.startswith("node_1 ")).split()
    assert row[1:4] == ["worker", "(fork)", "live"]


def test_metrics_and_report_of_a_fork_experiment_keep_every_row_with_the_forks_values(tmp_path):
    from p2pswarm import get_experiment_metrics

    now = time.time()
    exp = write_fork_experiment(tmp_path, now)
    damage(exp)
    df = get_experiment_metrics(str(tmp_path), FORK_EXP)
    assert len(df) == 4 * ROUNDS * len(NODES)  # every row the fork wrote, none of the damaged ones
    for n in NODES:
        written = jsonl(exp / "logs" / n / "metrics.jsonl") if n != "node_1" else [
            json.loads(line) for line in (exp / "logs" / n / "metrics.jsonl").read_text().splitlines()[:4 * ROUNDS]]
        mine = df[df["node_id"] == n]
        assert list(mine["round"]) == [w["round"] for w in written]
        assert list(mine["timestamp"]) == [w["timestamp"] for w in written]
        for got, w in zip(mine["my_reward"], written):
            assert got == w["my_reward"] if "my_reward" in w else math.isnan(got)
        assert list(mine["row_kind"]) == ["reward", "cumulative", "stage", "reward"] * ROUNDS
        assert (mine["node"] == n).all() and (mine["stage"] == 0).all()
    agg = get_experiment_metrics(str(tmp_path), FORK_EXP, aggregate_by_round=True)
    assert len(agg) == ROUNDS * len(NODES) and set(agg.columns) >= {"node_id", "round", "my_reward", "timestamp"}
    for rec in agg.to_dict("records"):  # the fork's own aggregate: its two summary rows a round, summed
        assert rec["my_reward"] == 2 * reward_of(rec["node_id"], rec["round"])

    out = tmp_path / "fork.png"
    res = CliRunner().invoke(app, ["report", "--drive-path", str(tmp_path), "--experiment", FORK_EXP, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "4 node(s)" in res.stdout and f"rounds 0-{ROUNDS - 1}" in res.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ---- the fork's readers on our files ------------------------------------------------------------------------
def fork_get_experiment_metrics(root: Path, name: str, aggregate_by_round: bool = False):
    """rgym_exp/utils/experiment_manager.get_experiment_metrics, as the fork has it."""
    import pandas as pd

    logs, rows = root / "experiments" / name / "logs", []
    for node_dir in os.listdir(logs):
        f = logs / node_dir / "metrics.jsonl"
        if f.exists():
            for line in f.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    df = pd.DataFrame(rows)
    if aggregate_by_round and not df.empty and "round" in df.columns and "my_reward" in df.columns:
        df = df.groupby(["node_id", "round"]).agg({"my_reward": "sum", "timestamp": "first",
                                                   **{c: "last" for c in df.columns if c.startswith("adaptive_")}}).reset_index()
    return df


def fork_get_experiment_status(root: Path, name: str) -> dict:
    """rgym_exp/utils/experiment_manager.get_experiment_status (and get_cumulative_rewards), as the fork has it."""
    exp = root / "experiments" / name
    status = {}
    state = json.loads((exp / "state" / "current_state.json").read_text())
    status.update(current_round=state.get("round", 0), current_stage=state.get("stage", 0),
                  last_updated=state.get("updated_at", 0))
    files = [f for f in os.listdir(exp / "peers") if f.endswith(".json")]
    status.update(active_peers=len(files), peer_ids=[f.replace(".json", "") for f in files])
    cumulative = {}
    for node_dir in os.listdir(exp / "logs"):
        f = exp / "logs" / node_dir / "cumulative_metrics.jsonl"
        if f.exists() and (lines := f.read_text().splitlines()):
            last = json.loads(lines[-1])
            cumulative[last.get("peer_id", node_dir)] = last.get("cumulative_reward", 0.0)
    if cumulative:
        status.update(cumulative_rewards=cumulative, total_cumulative_reward=sum(cumulative.values()))
    df = fork_get_experiment_metrics(root, name)
    if not df.empty:
        status["total_metric_entries"] = len(df)
    return status


def fork_get_experiment_progress(root: Path, name: str) -> dict:
    """rgym_exp/utils/progress_tracker.get_experiment_progress, as the fork has it."""
    exp, nodes = root / "experiments" / name, {}
    for f in os.listdir(exp):
        if f.startswith("progress_") and f.endswith(".json"):
            latest = json.loads((exp / f).read_text().splitlines()[-1])
            nodes[f.replace("progress_", "").replace(".json", "")] = {
                "latest_event": latest.get("event"), "latest_round": latest.get("round"),
                "elapsed_seconds": latest.get("elapsed_seconds"), "last_update": latest.get("timestamp")}
    return nodes


OUR_EXP = "ours-for-fork"
OUR_NODES = ("coord", "w1")
OUR_ROUNDS = 3


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_the_forks_readers_get_real_numbers_from_a_drive_run_of_ours(tmp_path):
    drive = tmp_path / "drive"
    procs = Procs(tmp_path)
    try:
        for n in OUR_NODES:
            procs.start(n, drive_cmd(drive, tmp_path / "runs" / n, n, "coordinator" if n == "coord" else "worker",
                                     OUR_ROUNDS, "collect_peers=1", "collect_timeout=120", "round_deadline=30",
                                     experiment=OUR_EXP))
        for n in OUR_NODES:
            procs.wait_exit(n, HANG)
    finally:
        procs.kill_all()
    exp = drive / "experiments" / OUR_EXP
    ours = {n: jsonl(tmp_path / "runs" / n / "metrics.jsonl") for n in OUR_NODES}
    assert all(len(rows) >= 1 for rows in ours.values())

    df = fork_get_experiment_metrics(drive, OUR_EXP)
    assert len(df) == sum(len(rows) for rows in ours.values())
    for col in ("my_reward", "node_id", "timestamp", "stage"):
        assert not df[col].isna().any(), col
    for n, rows in ours.items():
        mine = df[df["node_id"] == n]
        assert list(mine["round"]) == [r["round"] for r in rows]
        assert list(mine["my_reward"]) == [r["reward_local_mean"] for r in rows]
        assert list(mine["timestamp"]) == [r["time"] for r in rows] and (mine["stage"] == 0).all()
        assert list(mine["peer"]) == [r["peer"] for r in rows]  # our own fields are all still there
    agg = fork_get_experiment_metrics(drive, OUR_EXP, aggregate_by_round=True)
    assert len(agg) == len(df) and not agg["my_reward"].isna().any()  # one row a round each: nothing dropped

    st = fork_get_experiment_status(drive, OUR_EXP)
    assert st["active_peers"] == 2 and sorted(st["peer_ids"]) == sorted(OUR_NODES)
    assert st["total_metric_entries"] == len(df)
    totals = {n: sum(r["reward_local_mean"] for r in rows) for n, rows in ours.items()}
    assert st["cumulative_rewards"] == pytest.approx(totals) and st["total_cumulative_reward"] == pytest.approx(sum(totals.values()))
    # last_updated is the clock's updated_at: written by the coordinator's state file (the fork-safety part)
    assert "last_updated" in st

    for n, rows in ours.items():
        cumulative = jsonl(exp / "logs" / n / "cumulative_metrics.jsonl")
        assert [c["round"] for c in cumulative] == [r["round"] for r in rows]
        assert cumulative[-1]["cumulative_reward"] == pytest.approx(totals[n]) and cumulative[-1]["peer_id"] == n
        events = jsonl(exp / "logs" / n / "training_events.jsonl")
        assert {"node_started", "round_finished", "node_stopped"} <= {e["event_type"] for e in events}
        assert all(e["node_id"] == n and e["experiment"] == OUR_EXP and e["timestamp"] > 0 for e in events)
        for r in rows:  # the reward submissions the fork's coordinator counts
            sub = json.loads((exp / "rewards" / f"round_{r['round']}" / "stage_0" / f"{n}.json").read_text())
            assert sub == {"round": r["round"], "stage": 0, "reward": r["reward_local_mean"], "peer_id": n,
                           "submitted_at": r["time"]}
    progress = fork_get_experiment_progress(drive, OUR_EXP)
    assert set(progress) == set(OUR_NODES)
    for n, p in progress.items():
        assert p["latest_event"] == "training_complete" and p["last_update"] > 0 and p["elapsed_seconds"] > 0

    # and ours still reads its own rows as before: one a round, my_reward = reward_local_mean
    from p2pswarm import get_experiment_metrics, get_experiment_status

    mine = get_experiment_metrics(str(drive), OUR_EXP)
    assert len(mine) == len(df) and set(mine["row_kind"]) == {"round"}
    assert get_experiment_status(str(drive), OUR_EXP)["cumulative_rewards"] == pytest.approx(totals)

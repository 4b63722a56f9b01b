"""Checkpoints: a restarted run resumes where its last checkpoint left off, even after SIGKILL."""

import json
import os
import signal
import subprocess
import time

from conftest import cli, make_settings
from p2pswarm.node import build_agent, run_agents


def test_stop_and_start_again_resumes_and_appends(tmp_path):
    s = make_settings(tmp_path, rounds=2, checkpoint_every=1, node_id="n1")
    a = build_agent(s)
    run_agents([a])
    first = a.trainer.model.state_dict()
    b = build_agent(s.model_copy(update={"rounds": 4}))
    run_agents([b], 4)
    assert [r["round"] for r in b.run_dir.read_metrics()] == [0, 1, 2, 3]
    kinds = [json.loads(l)["kind"] for l in b.run_dir.events_path.read_text().splitlines()]
    assert kinds.count("resumed") == 1
    c = build_agent(s)  # the same identity and folder: the weights of the checkpoint come back
    c.restore()
    assert any(not (c.trainer.model.state_dict()[k] == first[k]).all() for k in first)  # trained further than run 1


def test_sigkill_loses_at_most_k_rounds(tmp_path):
    runs = tmp_path / "runs"
    # A node on its own (in a hivemind swarm a restarted node follows the swarm's clock instead of replaying
    # the rounds it lost: tests/test_hivemind.py checks that).
    args = cli("run", "--headless", "--comm", "inprocess", "--node-id", "victim", "--checkpoint-every", "2",
               "--set", f"runs_dir={runs}", "--set", "eval_every=0")
    out = runs / "default" / "victim"
    proc = subprocess.Popen(args + ["--rounds", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if len(rows) >= 7:
                break
            time.sleep(0.2)
        assert len(rows) >= 7, "the node did not get through 7 rounds in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done_before = len((out / "metrics.jsonl").read_text().splitlines())
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    last = int(checkpoints[-1].split("_")[1])
    assert done_before - 1 - last <= 2  # at most K=2 rounds lost
    target = done_before + 2
    res = subprocess.run(args + ["--rounds", str(target)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {out / 'checkpoints' / checkpoints[-1]}" in res.stdout
    rounds = [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(target))  # replayed rounds replace their lost rows; nothing twice
    assert not list((out / "checkpoints").glob(".tmp-*"))

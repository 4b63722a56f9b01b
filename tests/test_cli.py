"""The command line as a user meets it: help, clear errors, and a short headless run."""

import subprocess

from conftest import cli


def run(*args, timeout=240):
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0 and "run" in res.stdout and "eval" in res.stdout
    assert "--num-generations" in run("run", "--help").stdout


def test_invalid_setting_stops_at_start_naming_it():
    res = run("run", "--headless", "--num-generations", "1")
    assert res.returncode == 2
    assert "num_generations" in res.stderr and "Traceback" not in res.stderr
    res = run("run", "--headless", "--set", "loss_type=ppo")
    assert res.returncode == 2 and "loss_type" in res.stderr


def test_missing_model_is_a_one_line_error(tmp_path):
    res = run("run", "--headless", "--model", str(tmp_path / "nope"), "--set", f"runs_dir={tmp_path}")
    assert res.returncode == 1
    assert "cannot load model" in res.stderr and "Traceback" not in res.stderr


def test_headless_run_prints_a_line_per_round(tmp_path):
    res = run("run", "--headless", "--rounds", "3", "--set", f"runs_dir={tmp_path}", "--set", "eval_every=3",
              "--set", "eval_size=20", "--node-id", "cli-node")
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stdout.splitlines() if "| reward" in l]
    assert len(lines) == 3 and "round    2" in lines[-1] and "eval" in lines[-1]
    metrics = (tmp_path / "default" / "cli-node" / "metrics.jsonl").read_text().splitlines()
    import json

    row = json.loads(metrics[-1])
    for key in ("round", "peer", "reward_mean", "reward_local_mean", "reward_swarm_mean", "local_groups",
                "swarm_groups", "swarm_peers", "loss", "kl", "gen_tokens_per_s", "round_seconds", "eval_reward"):
        assert key in row

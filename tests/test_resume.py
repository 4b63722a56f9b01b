"""Checkpoints: a restarted run resumes where its last checkpoint left off, even after SIGKILL."""

import pytest
import torch

from helpers import HANG, PROCESS_TEST_TIMEOUT, cli, events, kill_tree, make_settings, metrics, run_process, wait_until
from p2pswarm.node import build_agent, run_agents


def test_stop_and_start_again_resumes_and_appends(tmp_path):
    s = make_settings(tmp_path, rounds=2, checkpoint_every=1, node_id="n1")
    a = build_agent(s)
    run_agents([a])
    first = {k: v.clone() for k, v in a.trainer.model.state_dict().items()}
    b = build_agent(s.model_copy(update={"rounds": 4}))
    run_agents([b], 4)
    assert [r["round"] for r in b.run_dir.read_metrics()] == [0, 1, 2, 3]
    kinds = [e["kind"] for e in events(b.run_dir.path)]
    assert kinds.count("resumed") == 1
    last = b.trainer.model.state_dict()
    assert any(not torch.equal(last[k], first[k]) for k in first)  # run 2 trained further than run 1
    c = build_agent(s)  # the same identity and folder: the weights of the last checkpoint come back
    assert c.restore() == 4  # rounds 0-3 done: round 4 is next
    restored = c.trainer.model.state_dict()
    assert restored.keys() == last.keys()
    for k in last:
        assert torch.equal(restored[k], last[k]), k


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_sigkill_loses_at_most_k_rounds(tmp_path, procs):
    runs = tmp_path / "runs"
    # A node on its own (in a hivemind swarm a restarted node follows the swarm's clock instead of replaying
    # the rounds it lost: tests/test_hivemind.py checks that).
    args = cli("run", "--headless", "--comm", "inprocess", "--node-id", "victim", "--checkpoint-every", "2",
               "--set", f"runs_dir={runs}", "--set", "eval_every=0")
    out = runs / "default" / "victim"
    victim = procs.start("victim", args + ["--rounds", "500"])
    wait_until(lambda: len(metrics(out)) >= 7 or victim.poll() is not None, HANG, "7 rounds played",
               lambda: procs.log("victim"))
    assert victim.poll() is None, procs.log("victim")[-3000:]
    kill_tree(victim)
    done_before = len((out / "metrics.jsonl").read_text().splitlines())
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    last = int(checkpoints[-1].split("_")[1])
    assert done_before - 1 - last <= 2  # at most K=2 rounds lost
    target = done_before + 2
    res = run_process(args + ["--rounds", str(target)], timeout=HANG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {out / 'checkpoints' / checkpoints[-1]}" in res.stdout
    rounds = [r["round"] for r in metrics(out)]
    assert rounds == list(range(target))  # replayed rounds replace their lost rows; nothing twice
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_full_disk_at_checkpoint_time_does_not_stop_training(tmp_path, monkeypatch):
    """Saves that fail (ENOSPC) are logged and retried at the next checkpoint; the node plays on and the
    previous checkpoint stays; a save that works again clears the count."""
    from p2pswarm.run import RunDir

    s = make_settings(tmp_path, rounds=5, checkpoint_every=1, node_id="n1")
    a = build_agent(s)
    real, calls = RunDir.save_checkpoint, []

    def disk(self, round, *args, **kw):
        calls.append(round)
        if round in (1, 2):  # the disk is full for two saves, then space is freed
            raise OSError(28, "No space left on device")
        return real(self, round, *args, **kw)

    monkeypatch.setattr(RunDir, "save_checkpoint", disk)
    run_agents([a])
    assert [r["round"] for r in a.run_dir.read_metrics()] == [0, 1, 2, 3, 4]  # every round played
    assert calls == [0, 1, 2, 3, 4] and a.run_dir.checkpoint_rounds()[-1] == 4
    errors = [e for e in events(a.run_dir.path) if e["kind"] == "error"]
    assert len(errors) == 2 and "round 1" in errors[0]["message"]
    assert a.checkpoint_failures == 0


def test_a_failing_event_listener_does_not_stop_the_node(tmp_path):
    """An observer (a full disk under events.jsonl, a UI gone) is logged once; the round loop plays on."""
    s = make_settings(tmp_path, rounds=2, node_id="n1")
    a = build_agent(s)
    seen = []

    def broken(event):
        raise OSError(28, "No space left on device")

    a.events.subscribe(broken)
    a.events.subscribe(lambda e: seen.append(e.kind))  # a listener after the broken one still hears every event
    run_agents([a])
    assert [r["round"] for r in a.run_dir.read_metrics()] == [0, 1]
    assert "round_finished" in seen and seen[-1] == "node_stopped"

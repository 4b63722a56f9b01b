"""TensorBoard and W&B trackers: a real node's metrics rows, read back from what each tool wrote."""

from __future__ import annotations

import sys

import pytest

from helpers import HANG, make_settings, wait_until
from p2pswarm.trackers import TrackerError, attach_trackers, scalars

SMALL = dict(tasks_per_round=2, num_generations=2, max_new_tokens=8, threads=1, eval_every=2, eval_size=4,
             checkpoint_every=1)


def play(tmp_path, rounds: int, **kw):
    """One in-process node of the embedded policy plays up to round index `rounds`; its metrics rows."""
    from p2pswarm.node import build_swarm, run_agents

    s = make_settings(tmp_path, agents=1, rounds=rounds, node_id="tracked", **SMALL, **kw)
    agents = build_swarm(s)
    run_agents(agents)
    return agents[0], agents[0].run_dir.read_metrics()


def test_scalars_are_the_numeric_fields_of_a_row_flattened():
    row = {"round": 3, "time": 1.0, "peer": "12D3", "reward_mean": 0.5, "reward_swarm_mean": None,
           "skipped_update": True, "local_groups": 4, "loss": float("nan"), "comm": {"dropped_bad_task": 2}}
    assert scalars(row) == {"reward_mean": 0.5, "skipped_update": 1.0, "local_groups": 4.0, "comm/dropped_bad_task": 2.0}


def test_tensorboard_event_files_hold_every_metrics_row_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    play(tmp_path, 3, tensorboard_dir=tb)
    _, rows = play(tmp_path, 4, tensorboard_dir=tb)  # resumes after round 2: one more round
    assert [r["round"] for r in rows] == [0, 1, 2, 3]

    acc = EventAccumulator(str(tb / "tracked"), size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_local_mean", "loss", "signal_fraction", "eval_reward"} <= tags
    assert any(t.startswith("comm/") for t in tags)
    for tag in ("reward_local_mean", "loss", "round_seconds"):
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [0, 1, 2, 3], tag
        assert [p.value for p in points] == pytest.approx([r[tag] for r in rows], rel=1e-5), tag
    # held-out evaluation every 2 rounds: rounds 1 and 3
    evals = acc.Scalars("eval_reward")
    assert [p.step for p in evals] == [1, 3]
    assert [p.value for p in evals] == pytest.approx([rows[1]["eval_reward"], rows[3]["eval_reward"]], rel=1e-5)


def wandb_records(path):
    """The protobuf records of a W&B transaction log (run-*.wandb): a ":W&B" header, then a LevelDB-style log of
    32 KiB blocks of chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last). wandb
    has no Python reader of its own any more (wandb-core writes it)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_writes_a_run_folder_with_the_metrics(tmp_path, monkeypatch):
    import json

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    agent, rows = play(tmp_path, 2, wandb_project="p2pswarm-test")  # wandb_mode defaults to offline
    runs = list((agent.run_dir.path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    log_file = next(runs[0].glob("run-*.wandb"))

    def finished() -> list:  # wandb-core (a process of its own) may still be writing when finish() returns
        records = list(wandb_records(log_file))
        return records if any(r.WhichOneof("record_type") == "exit" for r in records) else []

    records = wait_until(finished, HANG, "exit record in the W&B run log")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [0, 1]
    for h, row in zip(history, rows):
        assert h["reward_local_mean"] == pytest.approx(row["reward_local_mean"])
        assert h["loss"] == pytest.approx(row["loss"])
        assert any(k.startswith("comm/") for k in h)
    assert history[1]["eval_reward"] == pytest.approx(rows[1]["eval_reward"])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "p2pswarm-test" and run.display_name == "tracked"
    config = {i.key for i in run.config.update}
    assert "wandb_project" in config and "hub_token" not in config  # settings, never the token


@pytest.mark.parametrize("setting,package", [({"tensorboard_dir": "tb"}, "tensorboard"),
                                             ({"wandb_project": "p"}, "wandb")])
def test_a_tracker_without_its_package_says_what_to_install(tmp_path, monkeypatch, setting, package):
    from p2pswarm.events import EventBus
    from p2pswarm.run import RunDir

    # None in sys.modules makes the import fail as if the package were not installed
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    s = make_settings(tmp_path, **setting)
    with pytest.raises(TrackerError, match=rf"pip install 'p2pswarm\[{package}\]'"):
        attach_trackers(s, RunDir(tmp_path / "run"), EventBus(), "n")

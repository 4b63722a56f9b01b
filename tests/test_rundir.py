"""The run folder survives kills: cut metrics lines, half-written checkpoints."""

import json

import pytest

from p2pswarm.run import RunDir


class FakeSave:
    """A Trainer.save stand-in that writes a file, or dies half-way like a killed process."""

    def __init__(self, fail=False):
        self.fail = fail

    def save(self, path):
        (path / "weights.bin").write_bytes(b"w")
        if self.fail:
            raise KeyboardInterrupt("killed mid-save")


def test_truncate_drops_replayed_rounds_and_a_cut_line(tmp_path):
    run = RunDir(tmp_path)
    for r in range(5):
        run.append_metrics({"round": r})
    with open(run.metrics_path, "a") as f:
        f.write('{"round": 5, "rew')  # a kill in the middle of a write
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]
    assert run.truncate_metrics(2) == 2
    assert run.metrics_path.read_text() == "".join(json.dumps({"round": r}) + "\n" for r in range(3))
    run.append_metrics({"round": 3})
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3]


def test_checkpoints_are_all_or_nothing_and_pruned(tmp_path):
    run = RunDir(tmp_path)
    for r in range(4):
        run.save_checkpoint(r, FakeSave(), keep=2)
    assert run.checkpoint_rounds() == [2, 3]
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(4, FakeSave(fail=True), keep=2)
    assert run.latest_checkpoint() == (3, run.checkpoint_path(3))  # the half-written round 4 is invisible
    run.save_checkpoint(5, FakeSave(), keep=2)
    assert run.checkpoint_rounds() == [3, 5]
    assert not list(run.checkpoints.glob(".tmp-*"))  # the leftover of the killed save is cleaned up
    assert json.loads((run.checkpoint_path(5) / "state.json").read_text())["round"] == 5

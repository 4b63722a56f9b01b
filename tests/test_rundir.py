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


class FullDisk:
    """A Trainer.save on a disk that fills up half-way."""

    def save(self, path):
        (path / "weights.bin").write_bytes(b"w" * 4096)
        raise OSError(28, "No space left on device")


def test_a_save_on_a_full_disk_leaves_nothing_behind_and_keeps_the_last_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(1, FakeSave(), keep=2)
    for _ in range(3):  # every restart under a supervisor tries again
        with pytest.raises(OSError):
            run.save_checkpoint(2, FullDisk(), keep=2)
        assert not list(run.checkpoints.glob(".*"))  # no half-written copy left to hold the space
    assert run.checkpoint_rounds() == [1]
    (tmp_path / ".x.jsonl.99.tmp").write_text("")  # (atomic_write_text below must clean only its own)
    from p2pswarm.run import atomic_write_text

    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "state.json", None)  # fails while writing
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".x.jsonl.99.tmp"]


def test_a_checkpoint_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    """Re-saving round 3 moves the old copy aside, then renames the new one in: a kill in between leaves
    round 3 only as `.old-...`; the next save puts it back (and clears half-written folders)."""
    run = RunDir(tmp_path)
    run.save_checkpoint(3, FakeSave(), keep=3)
    (run.checkpoint_path(3)).rename(run.checkpoints / ".old-round_000003-4242")
    (run.checkpoints / ".tmp-round_000004-4343").mkdir()
    assert run.checkpoint_rounds() == []
    run.save_checkpoint(4, FakeSave(), keep=3)
    assert run.checkpoint_rounds() == [3, 4]
    assert not list(run.checkpoints.glob(".*"))


def test_an_event_line_cut_by_a_kill_is_dropped_before_the_next_start_appends(tmp_path):
    run = RunDir(tmp_path)
    run.events_path.write_text('{"kind": "round_started", "round": 1}\n{"kind": "round_fini')
    assert run.repair_events()
    assert run.events_path.read_text() == '{"kind": "round_started", "round": 1}\n'
    assert not run.repair_events()  # an intact file is left as it is

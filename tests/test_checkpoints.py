"""Checkpoints load as data only: a planted pickle never runs, an altered file is refused, older ones load."""

import json
import pathlib
import subprocess

import pytest
import torch

from helpers import cli, make_settings
from p2pswarm import models
from p2pswarm.run import RunDir
from p2pswarm.trainer import CHECKSUMS, CheckpointError, GRPOTrainer, _sha256


class Planted:
    """Unpickling this writes a file: what code in a checkpoint could do."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.target), "pwned")


@pytest.fixture(scope="module")
def policy(policy_path):
    return models.load(policy_path, torch.device("cpu"), torch.float32)


def checkpoint(tmp_path, policy, settings=None):
    model, tok = policy
    t = GRPOTrainer(model, tok, settings or make_settings(tmp_path))
    run = RunDir(tmp_path / "run")
    return t, run.save_checkpoint(0, t, keep=1)


def fresh(tmp_path, policy_path):
    model, tok = models.load(policy_path, torch.device("cpu"), torch.float32)
    return GRPOTrainer(model, tok, make_settings(tmp_path))


def plant(path, target, *, update_checksums: bool):
    torch.save({"optimizer": Planted(str(target)), "rng": None}, path / "trainer.pt")
    if update_checksums:  # an attacker who can rewrite the checksum file too
        sums = json.loads((path / CHECKSUMS).read_text())
        sums["sha256"]["trainer.pt"] = _sha256(path / "trainer.pt")
        (path / CHECKSUMS).write_text(json.dumps(sums))
    else:
        (path / CHECKSUMS).unlink()  # or a checkpoint of an earlier version: no checksums at all


@pytest.mark.parametrize("update_checksums", [True, False])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, policy, policy_path, update_checksums):
    _, path = checkpoint(tmp_path, policy)
    target = tmp_path / "pwned.txt"
    plant(path, target, update_checksums=update_checksums)
    with pytest.raises(CheckpointError) as e:
        fresh(tmp_path, policy_path).load(path)
    msg = str(e.value)
    assert "\n" not in msg and "trainer.pt is not a plain tensor file" in msg and str(path) in msg
    assert not target.exists()


@pytest.mark.parametrize("name", ["trainer.pt", "model/model.safetensors"])
def test_an_altered_file_is_refused(tmp_path, policy, policy_path, name):
    _, path = checkpoint(tmp_path, policy)
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the tensor data
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match its checksum"):
        fresh(tmp_path, policy_path).load(path)


def test_a_checkpoint_without_checksums_still_loads_as_data(tmp_path, policy, policy_path):
    """What the previous version wrote: the same trainer.pt keys, no checksums.json."""
    t, path = checkpoint(tmp_path, policy)
    (path / CHECKSUMS).unlink()
    t2 = fresh(tmp_path, policy_path)
    t2.load(path)
    assert t2.rng.random() == t.rng.random()
    for (n, a), (_, b) in zip(t.model.state_dict().items(), t2.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_pickled_model_file_is_never_read(tmp_path, policy, policy_path):
    """transformers would fall back to a pickled pytorch_model.bin when there is no safetensors file."""
    _, path = checkpoint(tmp_path, policy)
    (path / "model" / "model.safetensors").unlink()
    (path / CHECKSUMS).unlink()
    target = tmp_path / "pwned.txt"
    torch.save({"x": Planted(str(target))}, path / "model" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="its model does not load"):
        fresh(tmp_path, policy_path).load(path)
    assert not target.exists()


@pytest.mark.slow
def test_the_node_stops_with_one_line_on_a_planted_checkpoint(tmp_path, policy):
    out = tmp_path / "node"
    RunDir(out).save_checkpoint(0, GRPOTrainer(*policy, make_settings(tmp_path)), keep=1)
    path = out / "checkpoints" / "round_000000"
    target = tmp_path / "pwned.txt"
    plant(path, target, update_checksums=True)
    res = subprocess.run(cli("run", "--headless", "--comm", "inprocess", "--node-id", "n", "--rounds", "2",
                             "--output-dir", str(out), "--set", "eval_every=0"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "refusing the checkpoint" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    assert not target.exists()

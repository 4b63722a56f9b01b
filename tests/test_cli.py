"""The command line as a user meets it: help, clear errors, and a short headless run."""

import subprocess
import sys

from helpers import HANG, cli, metrics, run_process


def run(*args, timeout=HANG):
    return run_process(cli(*args), timeout)


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
    assert "cannot load model" in res.stderr and "no such folder" in res.stderr and "Traceback" not in res.stderr


def test_headless_run_prints_a_line_per_round(tmp_path):
    res = run("run", "--headless", "--rounds", "3", "--set", f"runs_dir={tmp_path}", "--set", "eval_every=3",
              "--set", "eval_size=20", "--node-id", "cli-node")
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stdout.splitlines() if "| reward" in l]
    assert len(lines) == 3 and "round    2" in lines[-1] and "eval" in lines[-1]
    row = metrics(tmp_path / "default" / "cli-node")[-1]
    for key in ("round", "peer", "reward_mean", "reward_local_mean", "reward_swarm_mean", "local_groups",
                "swarm_groups", "swarm_peers", "loss", "kl", "gen_tokens_per_s", "round_seconds", "eval_reward"):
        assert key in row


def test_any_causal_lm_folder_trains_through_the_hub_code_path(tmp_path, policy_path):
    """`--model PATH` goes through AutoModelForCausalLM/AutoTokenizer.from_pretrained, as a hub name does."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(policy_path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    folder = tmp_path / "my-model"
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    res = run("run", "--headless", "--model", str(folder), "--rounds", "1", "--set", f"runs_dir={tmp_path}",
              "--set", "eval_every=0", "--node-id", "m")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "default" / "m" / "checkpoints" / "round_000000" / "model" / "config.json").exists()


def test_hub_name_without_network_and_unavailable_device_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("run", "--headless", "--model", "Gensyn/Qwen2.5-0.5B-Instruct", "--set", f"runs_dir={tmp_path}")
    assert res.returncode == 1 and "cannot load model 'Gensyn/Qwen2.5-0.5B-Instruct'" in res.stderr
    import torch

    if not torch.cuda.is_available():
        res = run("run", "--headless", "--device", "cuda", "--set", f"runs_dir={tmp_path}")
        assert res.returncode == 1 and "CUDA is not available" in res.stderr


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The contract for anything a user can cause: a non-zero exit, one `error:` line, no traceback."""
    out = res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode not in (0, None) and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


def test_corrupt_identity_file_is_a_one_line_error(tmp_path):
    key = tmp_path / "garbage.key"
    key.write_bytes(b"not a key at all")
    res = run("run", "--headless", "--comm", "inprocess", "--identity", str(key), "--rounds", "1",
              "--set", f"runs_dir={tmp_path}")
    line = one_error_line(res)
    assert str(key) in line and "identity" in line
    assert key.read_bytes() == b"not a key at all"  # never overwritten: it may be someone's only key


def test_bootstrap_with_a_corrupt_identity_is_a_one_line_error(tmp_path):
    key = tmp_path / "boot.key"
    key.write_bytes(b"\x00" * 68)
    for cmd in ([sys.executable, "-m", "bootstrap"], cli("bootstrap")):
        res = subprocess.run([*cmd, "--host", "127.0.0.1", "--port", "0", "--identity", str(key)],
                             capture_output=True, text=True, timeout=120)
        assert str(key) in one_error_line(res), cmd


def test_eval_and_report_errors_are_one_line(tmp_path):
    assert "cannot load model" in one_error_line(run("eval", "--model", str(tmp_path / "nope")))
    assert "no experiment 'ghost'" in one_error_line(run("report", "--runs-dir", str(tmp_path), "--experiment", "ghost"))


def test_every_user_error_shares_one_base_and_the_ui_shows_it_without_its_class_name():
    from p2pswarm.analysis import ExperimentNotFound
    from p2pswarm.comm.hivemind.node import StartupError
    from p2pswarm.comm.torchdist import RankFailure
    from p2pswarm.data.reasoning_gym import PresetError
    from p2pswarm.errors import UserError
    from p2pswarm.identity import IdentityError
    from p2pswarm.models import ModelError
    from p2pswarm.settings import SettingsError
    from tui.engine import describe_error
    from tui.join import JoinError

    for cls in (SettingsError, IdentityError, ModelError, StartupError, PresetError, RankFailure, JoinError):
        assert issubclass(cls, UserError), cls
    assert issubclass(ExperimentNotFound, UserError) and issubclass(ExperimentNotFound, FileNotFoundError)
    assert describe_error(StartupError("cannot reach any initial peer")) == "cannot reach any initial peer"
    assert describe_error(KeyError("x")) == "KeyError: 'x'"

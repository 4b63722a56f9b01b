import logging

import pytest

from p2pswarm.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """None of the names a node reads, as this machine's environment may have set them."""
    from p2pswarm.settings import FORK_IGNORED, environment_names

    for name in (*environment_names(), *FORK_IGNORED, "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_precedence_defaults_toml_env_cli(tmp_path, monkeypatch):
    cfg = tmp_path / "swarm.toml"
    cfg.write_text('seed = 7\nnum_generations = 6\nexperiment = "from-toml"\n')
    assert load_settings().seed == 42
    assert load_settings(cfg).seed == 7
    monkeypatch.setenv("P2PSWARM_SEED", "9")
    assert load_settings(cfg).seed == 9
    assert load_settings(cfg, seed=11).seed == 11
    assert load_settings(cfg).num_generations == 6


def test_rl_swarm_environment_names(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "Gensyn/Qwen2.5-0.5B-Instruct")
    monkeypatch.setenv("EXPERIMENT_NAME", "my_sapo_experiment")
    monkeypatch.setenv("NODE_ID", "worker-1")
    s = load_settings()
    assert (s.model, s.experiment, s.node_id) == ("Gensyn/Qwen2.5-0.5B-Instruct", "my_sapo_experiment", "worker-1")
    assert s.learning_rate == 1e-6  # the default for a real model; the embedded one learns at 1e-4


@pytest.mark.parametrize("kwargs, name", [
    ({"num_generations": 1}, "num_generations"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"device": "tpu"}, "device"),
    ({"top_p": 1.5}, "top_p"),
    ({"local_groups": 0, "swarm_groups": 0}, r"local_groups \+ swarm_groups"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_invalid_values_name_the_setting(kwargs, name):
    with pytest.raises(SettingsError, match=name):
        load_settings(**kwargs)


def test_invalid_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("P2PSWARM_NUM_ITERATIONS", "many")
    with pytest.raises(SettingsError, match="P2PSWARM_NUM_ITERATIONS"):
        load_settings()


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3")
    with pytest.raises(SettingsError):
        load_settings(bad)


# ---- the environment: only P2PSWARM_* and the documented RL Swarm / Drive-fork names ----------------------
@pytest.fixture
def bare_env(monkeypatch):
    """Names other programs set, which a node must not take for its own settings."""
    for name, value in {"PORT": "8080", "HOST": "example.org", "ROUNDS": "3", "DEVICE": "gpu", "device": "tpu",
                        "COMM": "smoke", "AGENTS": "9", "Seed": "5", "model": "gpt-4"}.items():
        monkeypatch.setenv(name, value)


def test_bare_setting_names_in_the_environment_are_not_read(bare_env):
    s = load_settings()  # DEVICE=gpu used to stop the node ("setting 'device' (P2PSWARM_DEVICE) ...")
    assert (s.port, s.host, s.rounds, s.device, s.comm, s.agents, s.seed, s.model) == \
        (0, "0.0.0.0", None, "auto", "hivemind", 1, 42, "embedded")


def test_bare_names_still_work_in_the_config_file_and_as_overrides(bare_env, tmp_path, monkeypatch):
    cfg = tmp_path / "swarm.toml"
    cfg.write_text('port = 4000\ndevice = "cpu"\nrounds = 7\n')
    s = load_settings(cfg, seed=3)
    assert (s.port, s.device, s.rounds, s.seed) == (4000, "cpu", 7, 3)
    monkeypatch.setenv("P2PSWARM_PORT", "4001")  # the environment still outranks the file, by its real names
    assert load_settings(cfg).port == 4001
    assert load_settings(cfg, port=4002).port == 4002


def test_unknown_p2pswarm_variable_is_an_error_naming_it(monkeypatch):
    from typer.testing import CliRunner

    from p2pswarm.apps.cli import app

    monkeypatch.setenv("P2PSWARM_NUM_GENERATION", "8")
    with pytest.raises(SettingsError, match=r"P2PSWARM_NUM_GENERATION \(did you mean P2PSWARM_NUM_GENERATIONS\?\)"):
        load_settings()
    res = CliRunner().invoke(app, ["run", "--headless", "--rounds", "1"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown environment variable P2PSWARM_NUM_GENERATION ")


def test_the_projects_own_p2pswarm_variables_are_known(monkeypatch):
    """Every P2PSWARM_* name the repository, its scripts and CI set is a setting's."""
    for name, value in {"P2PSWARM_COMM": "inprocess", "P2PSWARM_DIST_TIMEOUT": "30", "P2PSWARM_COLLECT_TIMEOUT": "60",
                        "P2PSWARM_DRIVE_PATH": "/tmp/d", "P2PSWARM_EXPERIMENT": "e", "P2PSWARM_KEEP_ROUNDS": "0",
                        "P2PSWARM_ARCHIVE_ROLLOUTS": "true", "P2PSWARM_ROLE": "worker"}.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.comm, s.dist_timeout, s.collect_timeout, s.drive_path) == ("inprocess", 30, 60, "/tmp/d")


def test_fork_variables_are_mapped(monkeypatch):
    """The Drive fork's launcher variables (rgym_exp/runner/swarm_launcher.py), with the values its README uses."""
    fork = {"GDRIVE_PATH": "/content/drive/MyDrive/rl-swarm", "EXPERIMENT_NAME": "sapo_gpt2_4loc4ext",
            "NODE_ROLE": "worker", "NODE_ID": "worker_1", "MODEL_NAME": "openai-community/gpt2", "SEED": "7",
            "NUM_TRAIN_SAMPLES": "4", "NUM_TRANSPLANT_TREES": "4", "NUM_GENERATIONS": "8", "MAX_ROUNDS": "10",
            "CHECKPOINT_INTERVAL": "100", "ROLLOUT_PUBLISH_FREQUENCY": "round", "FETCH_MAX_PEERS": "10",
            "FETCH_TIMEOUT_SECONDS": "30", "HUGGINGFACE_ACCESS_TOKEN": "hf_abcdef"}
    for name, value in fork.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.drive_path, s.experiment, s.role, s.node_id, s.model, s.seed) == \
        ("/content/drive/MyDrive/rl-swarm", "sapo_gpt2_4loc4ext", "worker", "worker_1", "openai-community/gpt2", 7)
    assert (s.local_groups, s.swarm_groups, s.num_generations, s.rounds, s.checkpoint_every) == (4, 4, 8, 10, 100)
    assert (s.publish_frequency, s.collect_peers, s.collect_timeout) == ("round", 10, 30.0)
    assert s.hub_token.get_secret_value() == "hf_abcdef" and "hf_abcdef" not in repr(s)
    monkeypatch.setenv("P2PSWARM_ROUNDS", "12")  # our own name wins over the fork's
    assert load_settings().rounds == 12
    assert load_settings(rounds=3).rounds == 3


def test_bad_fork_value_names_the_variable_that_was_set(monkeypatch):
    monkeypatch.setenv("NUM_GENERATIONS", "1")
    with pytest.raises(SettingsError, match=r"setting 'num_generations' \(environment variable NUM_GENERATIONS\)"):
        load_settings()
    with pytest.raises(SettingsError, match=r"'num_generations' \(P2PSWARM_NUM_GENERATIONS\)"):
        load_settings(num_generations=1, model="x")  # the bad value came from the command line here
    monkeypatch.setenv("NUM_GENERATIONS", "8")
    monkeypatch.setenv("CHECKPOINT_INTERVAL", "0")  # the fork's "no checkpoints": not available here
    with pytest.raises(SettingsError, match="CHECKPOINT_INTERVAL"):
        load_settings()


def test_rl_swarm_declined_token_means_no_push(monkeypatch):
    from p2pswarm.hub import hub_push_enabled

    monkeypatch.setenv("HUGGINGFACE_ACCESS_TOKEN", "None")  # what RL Swarm's launch script exports on "no"
    assert load_settings().hub_token is None and not hub_push_enabled(load_settings())
    monkeypatch.setenv("HF_TOKEN", "hf_for_downloads")  # Colab's secret: alone, it publishes nothing
    assert not hub_push_enabled(load_settings())
    assert hub_push_enabled(load_settings(hub_repo="alice/my-policy"))
    assert not hub_push_enabled(load_settings(hub_repo="alice/my-policy", hub_push_every=0))
    for bad in ("a/b/c", "-x", "alice/my--policy", "x" * 97):
        with pytest.raises(SettingsError, match="hub_repo"):
            load_settings(hub_repo=bad)


def test_meaningless_fork_variables_are_named_in_one_warning(monkeypatch, tmp_path, caplog):
    from helpers import make_settings
    from p2pswarm.node import build_swarm

    for name, value in {"MAX_STAGES": "1", "ADAPTIVE_IJ_ENABLED": "True", "CACHE_ROLLOUTS": "false",
                        "COORDINATOR_ROUND_INTERVAL": "60", "NUM_GENERATIONS": "4"}.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level("WARNING"):
        agents = build_swarm(make_settings(tmp_path))
    for a in agents:
        a.comm.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for name in ("MAX_STAGES", "ADAPTIVE_IJ_ENABLED", "CACHE_ROLLOUTS", "COORDINATOR_ROUND_INTERVAL"):
        assert name in warnings[0]
    assert "NUM_GENERATIONS" not in warnings[0]  # mapped: it means something here


def test_thread_defaults_fit_the_model_and_the_agents(tmp_path):
    """0 threads means: 1 for the embedded policy (its matmuls are too small to split), 1 per in-process agent,
    all cores (None: torch's own) for any other model; a number is taken as it is."""
    from helpers import make_settings
    from p2pswarm.node import default_threads

    assert default_threads(make_settings(tmp_path)) == 1  # the embedded policy
    assert default_threads(make_settings(tmp_path, model="Qwen/Qwen2.5-0.5B-Instruct")) is None
    assert default_threads(make_settings(tmp_path, model="Qwen/Qwen2.5-0.5B-Instruct", agents=3)) == 1
    assert default_threads(make_settings(tmp_path, threads=3)) == 3

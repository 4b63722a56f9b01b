import pytest

from p2pswarm.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("MODEL_NAME", "EXPERIMENT_NAME", "NODE_ID", "SEED", "IDENTITY_PATH"):
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
    assert s.learning_rate == 1e-6  # the default for a real model; the embedded one learns at 3e-5


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

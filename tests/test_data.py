import random

import pytest

from p2pswarm.data.reasoning_gym import HELDOUT_SIZE, PresetError, ReasoningGymData, load_preset
from p2pswarm.rewards import rgym_score


def questions(tasks):
    return [t.question for t in tasks]


def test_round_tasks_are_deterministic_per_seed_round_and_peer():
    a = ReasoningGymData("easy", seed=7, peer="A")
    assert questions(a.round_tasks(3)) == questions(ReasoningGymData("easy", seed=7, peer="A").round_tasks(3))
    assert questions(a.round_tasks(3)) != questions(a.round_tasks(4))
    assert questions(a.round_tasks(3)) != questions(ReasoningGymData("easy", seed=7, peer="B").round_tasks(3))
    assert questions(a.round_tasks(3)) != questions(ReasoningGymData("easy", seed=8, peer="A").round_tasks(3))
    assert len(a.round_tasks(0)) == 8


def test_heldout_split_is_shared_and_never_trained_on():
    a, b = ReasoningGymData("easy", seed=1), ReasoningGymData("easy", seed=2)
    assert questions(a.eval_tasks()) == questions(b.eval_tasks())
    assert len(a.eval_tasks()) == HELDOUT_SIZE
    heldout = set(questions(a.eval_tasks()))
    trained = questions(a.sample_train(3000, random.Random(0)))
    assert not heldout & set(trained)


def test_presets_cover_the_expected_datasets():
    assert {s["name"] for s in load_preset("rl-swarm")} == {
        "arc_1d", "basic_arithmetic", "base_conversion", "bf", "binary_matrix", "calendar_arithmetic",
        "decimal_arithmetic", "fraction_simplification", "propositional_logic",
    }
    data = ReasoningGymData("easy", seed=0, tasks_per_round=64)
    assert {t.dataset for t in data.round_tasks(0)} == {s["name"] for s in load_preset("easy")}


def test_custom_preset_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("datasets:\n  - name: chain_sum\n    weight: 2\n    config: {min_terms: 2, max_terms: 2}\n")
    data = ReasoningGymData(str(f), seed=0)
    assert {t.dataset for t in data.round_tasks(0)} == {"chain_sum"}


@pytest.mark.parametrize("content, match", [
    ("", "non-empty 'datasets'"),
    ("[[datasets]]\nweight = 1\n", "needs a 'name'"),
    ("[[datasets]]\nname = 'no_such_dataset'\n", "reasoning-gym rejected"),
])
def test_bad_presets_fail_with_a_clear_error(tmp_path, content, match):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(PresetError, match=match):
        ReasoningGymData(str(f))
    with pytest.raises(PresetError, match="neither"):
        load_preset("does-not-exist")


def test_rescoring_from_wire_metadata_matches_the_original_entry():
    """Swarm rollouts are re-scored from metadata that went through msgpack; scores must not change."""
    import msgpack
    import reasoning_gym

    data = ReasoningGymData("rl-swarm", seed=5)
    for index in range(40):
        entry = data._train[index]
        task = data._task(entry, str(index))
        task.metadata = msgpack.unpackb(msgpack.packb(task.metadata))
        scorer = reasoning_gym.get_score_answer_fn(task.dataset)
        for guess in (entry["answer"], "0"):
            assert rgym_score(task, f"<answer>{guess}</answer>") == pytest.approx(scorer(guess, entry))

import pytest

from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.rewards import ReasoningGymRewards, extract_answer, format_score, rgym_score
from p2pswarm.types import Group, Task


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>5</answer>", "5"),
        ("I think <answer> 12 </answer>", "12"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last one counts
        ("<answer>1</answer> <answer>2", "1"),  # an unclosed last tag is not an answer
        ("<answer><answer>7</answer>", "7"),  # innermost opening tag before the last close
        ("</answer><answer>3", None),
        ("no tags at all", None),
        ("<answer></answer>", ""),
        ("<answer>a\nb</answer>", "a\nb"),
        ("5</answer>", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_format_score():
    assert format_score("<answer>1</answer>") == 1.0
    assert format_score("<answer>1</answer><answer>2</answer>") == 0.5
    assert format_score("1") == 0.0


def test_rgym_score_uses_the_dataset_scorer():
    data = ReasoningGymData("easy", seed=3)
    for task in data.round_tasks(0):
        assert rgym_score(task, f"<answer>{task.answer}</answer>") == 1.0
        assert rgym_score(task, "<answer>definitely wrong</answer>") < 1.0
        assert rgym_score(task, task.answer) == 0.0  # no answer tags: no reward


def test_unknown_dataset_scores_zero_instead_of_raising():
    task = Task("x", "no_such_dataset", "q", "1")
    assert rgym_score(task, "<answer>1</answer>") == 0.0


def test_reward_manager_rescores_and_adds_weighted_format_reward():
    task = Task("t", "chain_sum", "State the final answer to the following arithmetic problem: 2 + 3 =", "5",
                {"source_dataset": "chain_sum"})
    g = Group(task, ["<answer>5</answer>", "<answer>4</answer>", "5"], peer="p", sender_rewards=[0.0, 1.0, 1.0])
    ReasoningGymRewards(format_weight=0.5).score([g])
    assert g.rewards == [1.5, 0.5, 0.0]  # the sender's claimed rewards play no part

"""Rewards: the last <answer>...</answer> scored by reasoning-gym's scorer for the task's dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

from p2pswarm.components import RewardManager
from p2pswarm.types import Group, Task

log = logging.getLogger(__name__)

OPEN, CLOSE = "<answer>", "</answer>"


def extract_answer(text: str) -> str | None:
    """The content of the last complete <answer>...</answer>, stripped; None if there is none.

    The innermost opening tag before the last closing tag wins, so "<answer><answer>5</answer>" is "5".
    """
    end = text.rfind(CLOSE)
    if end < 0:
        return None
    start = text.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(OPEN) : end].strip()


def format_score(text: str) -> float:
    """1 for exactly one well-formed answer block, 0.5 for several, 0 for none."""
    n_close = text.count(CLOSE)
    if extract_answer(text) is None:
        return 0.0
    return 1.0 if n_close == 1 and text.count(OPEN) == 1 else 0.5


@lru_cache(maxsize=None)
def _scorer(dataset: str) -> Callable:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset)


def rgym_score(task: Task, completion: str) -> float:
    """reasoning-gym's score (0..1) of the completion's extracted answer against the task's answer."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    entry = {"question": task.question, "answer": task.answer, "metadata": task.metadata}
    try:
        score = float(_scorer(task.dataset)(answer, entry))
    except Exception as e:  # a scorer must never take a round down; unknown dataset, odd metadata...
        log.debug("scorer for %r failed: %s", task.dataset, e)
        return 0.0
    return min(max(score, 0.0), 1.0)


RewardFn = Callable[[Task, str], float]


class ReasoningGymRewards(RewardManager):
    """Correctness (+ an optional weighted format reward), with per-stage reward functions."""

    def __init__(self, format_weight: float = 0.0, stage_fns: dict[int, RewardFn] | None = None):
        self.format_weight = format_weight
        self.stage_fns = stage_fns or {}

    def reward(self, task: Task, completion: str) -> float:
        fn = self.stage_fns.get(task.stage, rgym_score)
        r = fn(task, completion)
        if self.format_weight:
            r += self.format_weight * format_score(completion)
        return r

    def score(self, groups: list[Group]) -> None:
        for g in groups:
            g.rewards = [self.reward(g.task, c) for c in g.completions]

"""A peer's completion (and a fork row's task fields) reach reasoning-gym's scorers, some of which evaluate
text as Python or through sympy's parser: what a hostile peer writes there must never run, and parser bombs
must be refused before they cost minutes. The right answers must still score as the scorers intend."""

import inspect
import re
import signal
from contextlib import contextmanager

import pytest
import reasoning_gym
from reasoning_gym.factory import DATASETS

from p2pswarm import rewards
from p2pswarm.data.reasoning_gym import jsonable
from p2pswarm.rewards import EVAL_ONLY_TO_GENERATE, EVALUATING, REFUSED, ReasoningGymRewards, rgym_score
from p2pswarm.types import Group, Task


@contextmanager
def deadline(seconds: int = 60):
    """Fail a hang instead of waiting on it (a generous bound, not a timing assertion)."""
    def hang(*_):
        raise AssertionError(f"scoring did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def real_task(dataset: str, index: int = 0, **config) -> Task:
    """A task as this node makes it (the same fields a re-derived swarm task has)."""
    entry = reasoning_gym.create_dataset(dataset, seed=7, size=index + 1, **config)[index]
    meta = jsonable(entry.get("metadata", {}))
    return Task(task_id=f"t{index}", dataset=dataset, question=entry["question"], answer=str(entry["answer"]),
                metadata=meta)


def score(task: Task, answers: list[str]) -> list[float]:
    """Through the reward manager the game uses on swarm groups."""
    g = Group(task=task, completions=[f"thinking... <answer>{a}</answer>" for a in answers], peer="hostile")
    with deadline():
        ReasoningGymRewards().score([g])
    return g.rewards


def payloads(marker) -> list[str]:
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return [touch, f"[{touch}]", f"[[{touch}, 1], [0, 1]]", f"({touch}) or 1",
            f"exec(chr(95)*2 + 'import' + chr(95)*2 + \"('pathlib').Path({str(marker)!r}).touch()\")"]


@pytest.mark.parametrize("dataset", sorted(d for d, rules in EVALUATING.items()
                                           if {"literal", "arith", "algebra"} & set(rules)))
def test_a_peers_answer_is_never_run_as_code(tmp_path, dataset):
    marker = tmp_path / "pwned"
    task = real_task(dataset)
    before = REFUSED[dataset]
    assert score(task, payloads(marker)) == [0.0] * 5
    assert not marker.exists(), f"{dataset}'s scorer ran a peer's answer"
    assert REFUSED[dataset] - before == 5  # refused before the scorer, and counted


def test_a_fork_rows_task_fields_are_never_run_as_code(tmp_path):
    """A fork rollout carries its own answer and metadata (nothing to re-derive): number_sorting evals the
    answer, bitwise_arithmetic the problem, the integration scorers parse the integrand with sympy."""
    marker = tmp_path / "pwned"
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    sorting = real_task("number_sorting")
    sorting.answer = touch
    bitwise = real_task("bitwise_arithmetic")
    bitwise.metadata = {**bitwise.metadata, "problem": touch}
    integ = real_task("simple_integration")
    integ.metadata = {**integ.metadata, "integrand": touch}
    for task in (sorting, bitwise, integ):
        assert score(task, ["[1, 2]", "0x10", "x**2 + C"]) == [0.0] * 3
    assert not marker.exists()


@pytest.mark.parametrize("dataset, task_edit, answer", [
    ("propositional_logic", None, "(" * 450 + "P" + ")" * 450),  # recursive descent: seconds a completion
    ("propositional_logic", None, " ∧ ".join(["P"] * 400)),
    ("puzzle24", None, "9**9**9**9"),  # sympy computes it exactly
    ("countdown", None, "9" * 5000),
    ("simple_integration", None, "N(pi, 10**7)"),  # sympy's N: pi to ten million digits
    ("simple_integration", None, "x.n(10000000)"),
    ("simple_integration", None, "(x + 1)**99999"),
    ("bitwise_arithmetic", {"problem": "0x1 << 0xffffffffff"}, "0x1"),  # a 128 GB integer
    ("binary_matrix", None, "not " * 8000 + "1"),
    ("spiral_matrix", None, "[" * 200 + "]" * 200),
], ids=["nested-450", "chain-400", "tower-of-powers", "5000-digits", "N-pi", "evalf-method", "big-expand",
        "huge-shift", "not-chain", "nested-lists"])
def test_parser_bombs_are_refused_before_the_scorer(dataset, task_edit, answer):
    task = real_task(dataset)
    if task_edit:
        task.metadata = {**task.metadata, **task_edit}
    before = REFUSED[dataset]
    assert score(task, [answer]) == [0.0]
    assert REFUSED[dataset] - before == 1


@pytest.mark.parametrize("dataset", sorted(EVALUATING) + ["propositional_logic", "basic_arithmetic", "arc_1d",
                                                          "palindrome_partitioning"])
def test_right_answers_still_score_as_the_scorer_says(dataset):
    """No false refusals: every oracle of 12 tasks passes the guard and gets the scorer's own score."""
    raw = reasoning_gym.get_score_answer_fn(dataset)
    before = REFUSED[dataset]
    for i in range(12):
        task = real_task(dataset, i)
        entry = {"question": task.question, "answer": task.answer, "metadata": task.metadata}
        expected = raw(task.answer, entry)
        assert rgym_score(task, f"<answer>{task.answer}</answer>") == pytest.approx(min(max(expected, 0.0), 1.0))
    assert REFUSED[dataset] == before


def test_an_answer_written_as_a_python_list_keeps_its_partial_credit():
    """binary_matrix gives 0.1 to the right matrix written as a list of lists: the literal still reaches it."""
    task = real_task("binary_matrix", min_n=2, max_n=2)
    rows = [[int(v) for v in line.split()] for line in task.answer.splitlines()]
    assert score(task, [task.answer, repr(rows)]) == [1.0, 0.1]


def test_every_scorer_that_evaluates_text_is_guarded():
    """reasoning-gym grows datasets: one whose module evals or sympifies text must be listed in EVALUATING (with
    what it evaluates) or, after reading it, in EVAL_ONLY_TO_GENERATE; this fails until someone has looked."""
    evaluates = re.compile(r"(?<![\w.])eval\(|(?<![\w.])exec\(|sympify\(|sympy_parser|\bsympy\.parse_expr|\bsp\.parse_expr")
    unlisted = []
    for name, (cls, _) in sorted(DATASETS.items()):
        if evaluates.search(inspect.getsource(inspect.getmodule(cls))) and \
                name not in EVALUATING and name not in EVAL_ONLY_TO_GENERATE:
            unlisted.append(name)
    assert unlisted == [], f"reasoning-gym scorers that may evaluate a peer's text, not guarded: {unlisted}"
    assert set(EVALUATING) <= set(DATASETS)  # a renamed dataset would leave its guard behind


def test_refusals_are_logged_once_per_dataset(caplog, tmp_path):
    rewards._LOGGED.discard("n_queens")
    task = real_task("n_queens")
    with caplog.at_level("WARNING", logger="p2pswarm.rewards"):
        score(task, payloads(tmp_path / "x") * 4)
    assert len([r for r in caplog.records if "n_queens" in r.getMessage()]) == 1

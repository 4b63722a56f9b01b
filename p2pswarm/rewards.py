"""Rewards: the last <answer>...</answer> scored by reasoning-gym's scorer for the task's dataset.

Every answer scored here may come from a peer (a swarm group's completion) and, for rl-swarm fork rollouts,
so may the task's answer and metadata. Some reasoning-gym scorers hand those strings to `eval` or to sympy's
parser, which evals too: `binary_matrix` evals an answer that does not match exactly, so one completion
`<answer>__import__('os').system(...)</answer>` would run on every node that scores it. And parsers of nested
text are superlinear (`propositional_logic`: seconds for one 32 KB answer). So before any scorer runs,
`refusal()` checks every string that scorer is known to evaluate against what evaluating it can do (Python
literals, inert words, arithmetic of bounded size), and caps every answer's length and nesting. A refused
answer scores 0 and is counted in `REFUSED`. `EVALUATING` lists the scorers that evaluate text; a test
scans reasoning-gym's source so that an upgrade adding `eval` to another scorer fails until it is listed.
"""

from __future__ import annotations

import ast
import logging
import re
from collections import Counter
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


# Any answer: longer than any reasoning-gym oracle (palindrome_partitioning's lists of every partition reach
# ~5,000 characters), or nested deeper than any of them, is not worth a parser's time.
MAX_ANSWER_CHARS = 16 * 1024
MAX_NESTING = 32
# Scorers that parse with recursive descent or sympy: their oracles are short, their cost grows with the text.
TIGHT_CHARS = {"propositional_logic": 256, "countdown": 200, "puzzle24": 200, "polynomial_multiplication": 400,
               "simple_integration": 400, "intermediate_integration": 400,
               # evaluated as Python (a chain of 8,000 `not`s is a parser's stack, not a literal's)
               "binary_matrix": 2048, "string_insertion": 2048, "spiral_matrix": 2048, "n_queens": 2048}

# Which strings each evaluating scorer evaluates (reasoning-gym 0.1.25), and how they must look:
#   literal: `eval` of the completion's answer, when it is not the exact oracle: a Python literal or inert words;
#   oracle:  `eval` of the task's answer (number_sorting, when it is not JSON): a literal;
#   hexarith: `eval` of metadata["problem"] (bitwise_arithmetic): hex arithmetic with small shifts;
#   arith / algebra: sympy's `parse_expr` (an eval) of the answer: numbers and operators / known functions.
EVALUATING: dict[str, tuple[str, ...]] = {
    "binary_matrix": ("literal",), "string_insertion": ("literal",), "spiral_matrix": ("literal",),
    "n_queens": ("literal",), "number_sorting": ("oracle",), "bitwise_arithmetic": ("hexarith",),
    "countdown": ("arith",), "puzzle24": ("arith",), "polynomial_multiplication": ("algebra", "oracle_algebra"),
    "simple_integration": ("algebra", "meta_algebra"), "intermediate_integration": ("algebra", "meta_algebra"),
}
# Datasets whose module evaluates text only while generating a task from our own recipe, never in scoring.
EVAL_ONLY_TO_GENERATE = frozenset({"basic_arithmetic", "codeio"})

REFUSED: Counter[str] = Counter()  # dataset -> answers refused before scoring
_LOGGED: set[str] = set()

_INERT = re.compile(r"[A-Za-z0-9_ \t\r\n-]*")  # names, numbers, minus: eval of these can call nothing
_ARITH = re.compile(r"[0-9+\-*/(). \t]*")
_ALGEBRA = re.compile(r"[0-9A-Za-z+\-*/(). \t]*")
_HEXARITH = re.compile(r"[0-9a-fA-Fx+\-*<>() \t]*")
_NAME = re.compile(r"[A-Za-z]\w*")
# sympy names an algebra answer may use: the functions and constants of the integration and polynomial tasks'
# oracles; single lowercase letters are symbols (sympy defines none of them at top level).
_ALGEBRA_NAMES = frozenset({"sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh", "tanh",
                            "exp", "log", "ln", "sqrt", "pi", "Abs", "Integral"})
_MAX_EXPONENT = 20  # x**20 and (1/2) fractions are the integration tasks' largest; 9**9**9 would hang sympy
_MAX_DIGITS = 12


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return deepest


def _literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError, MemoryError, RecursionError: not a literal
        return False
    return True


def _numbers_small(text: str) -> bool:
    return all(len(n) <= _MAX_DIGITS for n in re.findall(r"\d+", text))


def _arith(text: str) -> bool:
    return bool(_ARITH.fullmatch(text)) and "**" not in text and _numbers_small(text) and _dots_decimal(text)


def _dots_decimal(text: str) -> bool:
    # a dot only inside a number: `x.n(10**6)` (attribute access, then a call) is how sympy text would do work
    return all(0 < m.start() < len(text) - 1 and text[m.start() - 1].isdigit() and text[m.start() + 1].isdigit()
               for m in re.finditer(r"\.", text))


def _algebra(text: str, var: str = "x") -> bool:
    """Numbers, + - * / ( ), known functions, lowercase symbols, C, E and the task's variable; exponents small;
    a comma only as `Integral(..., var)` has it. sympy's own one-letter names (N: numeric evaluation to any
    precision, S: sympify) are not symbols there, so an uppercase letter is the variable, C or E only."""
    var = var if len(var) == 1 and var.isalpha() else "x"
    if not (_ALGEBRA.fullmatch(text.replace(",", "")) and _numbers_small(text) and _dots_decimal(text)):
        return False
    if any(not re.match(r",\s*" + re.escape(var) + r"\s*\)", text[m.start():]) for m in re.finditer(",", text)):
        return False
    for n in _NAME.findall(text):
        if not (n in _ALGEBRA_NAMES or len(n) == 1 and (n.islower() or n in ("C", "E", var))):
            return False
    pows = [m.end() for m in re.finditer(r"\*\*", text)]
    if len(pows) > 16:
        return False
    for end in pows:  # an exponent is a small number, a name, or a parenthesised small fraction
        m = re.match(r"\s*(?:(\d+)|[A-Za-z]\w*|\(\s*-?\s*(\d+)\s*(?:/\s*\d+\s*)?\))", text[end:])
        if m is None or int(m.group(1) or m.group(2) or 0) > _MAX_EXPONENT:
            return False
    return True


def _hexarith(text: str) -> bool:
    if len(text) > 512 or not _HEXARITH.fullmatch(text) or "**" in text or _nesting(text) > MAX_NESTING:
        return False
    # a shift by a literal of at most 64 (0x1 << 0xffffffff is a 512 MB integer)
    for m in re.finditer(r"(<<|>>)\s*(0[xX][0-9a-fA-F]+|\d+)?", text):
        if m.group(2) is None or int(m.group(2), 0) > 64:
            return False
    return True


def refusal(task: Task, answer: str) -> str | None:
    """Why `answer` (and this task's fields) must not reach the task's scorer, or None if they may."""
    limit = TIGHT_CHARS.get(task.dataset, MAX_ANSWER_CHARS)
    if len(answer) > limit:
        return f"answer over {limit} characters"
    if _nesting(answer) > MAX_NESTING:
        return f"answer nested over {MAX_NESTING} deep"
    var = str(task.metadata.get("variable", "x"))
    for rule in EVALUATING.get(task.dataset, ()):
        if rule == "literal" and not (_INERT.fullmatch(answer) or _literal(answer)):
            return "answer is neither a Python literal nor plain words (its scorer evals it)"
        if rule == "oracle" and not (len(task.answer) <= MAX_ANSWER_CHARS and _nesting(task.answer) <= MAX_NESTING
                                     and _literal(task.answer)):
            return "task answer is not a Python literal (its scorer evals it)"
        if rule == "hexarith" and not _hexarith(str(task.metadata.get("problem", ""))):
            return "task problem is not plain hex arithmetic (its scorer evals it)"
        if rule == "arith" and not _arith(answer):
            return "answer is not plain arithmetic (its scorer evals it with sympy)"
        if rule == "algebra" and not _algebra(answer, var):
            return "answer is not plain algebra (its scorer evals it with sympy)"
        if rule == "oracle_algebra" and not (len(task.answer) <= 400 and _algebra(task.answer, var)):
            return "task answer is not plain algebra (its scorer evals it with sympy)"
        integrand = str(task.metadata.get("integrand", ""))
        if rule == "meta_algebra" and not (len(integrand) <= 400 and _algebra(integrand, var)):
            return "task integrand is not plain algebra (its scorer evals it with sympy)"
    return None


@lru_cache(maxsize=None)
def _scorer(dataset: str) -> Callable:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset)


def rgym_score(task: Task, completion: str) -> float:
    """reasoning-gym's score (0..1) of the completion's extracted answer against the task's answer."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    why = refusal(task, answer)
    if why is not None:
        REFUSED[task.dataset] += 1
        if task.dataset not in _LOGGED:  # once per dataset: a hostile peer can send thousands
            _LOGGED.add(task.dataset)
            log.warning("not scoring an answer for %s: %s (scored 0; further refusals are only counted)",
                        task.dataset, why)
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

"""Answer verifiers with hand-made answers: right, wrong, malformed and hostile ones score in [0, 1], never raise,
never hang (every hostile case here would take minutes or run code through sympy's parse_expr)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from p2pswarm.data.verifiers import VerifierError, get_verifier

exact, numeric, math_ = get_verifier("exact"), get_verifier("numeric", 1e-6), get_verifier("math")


@pytest.mark.parametrize("answer,truth,score", [
    ("42", "42", 1.0), ("  42 ", "42", 1.0), ("New  York", "New York", 1.0),
    ("42.0", "42", 0.0), ("new york", "New York", 0.0), ("", "42", 0.0),
])
def test_exact(answer, truth, score):
    assert exact(answer, truth) == score


@pytest.mark.parametrize("answer,truth,score", [
    ("42", "42", 1.0), ("42.0", "42", 1.0), ("4.2e1", "42", 1.0), ("1,234", "1234", 1.0), ("$7$", "7", 1.0),
    ("3/4", "0.75", 1.0), ("-3.5", "-3.5", 1.0), ("0.3333333", "1/3", 1.0),
    ("43", "42", 0.0), ("0.33", "1/3", 0.0), ("forty-two", "42", 0.0), ("1,2", "12", 0.0), ("1/0", "1", 0.0),
])
def test_numeric(answer, truth, score):
    assert numeric(answer, truth) == score


def test_numeric_tolerance_is_the_setting():
    loose = get_verifier("numeric", 0.01)
    assert loose("3.14", "3.1416") == 1.0 and numeric("3.14", "3.1416") == 0.0


@pytest.mark.parametrize("answer,truth", [
    ("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("(1+\\sqrt{2})^2", "3+2\\sqrt{2}"), ("x+1", "1+x"),
    ("2x", "x \\cdot 2"), ("$\\boxed{5}$", "5"), ("x = 5", "5"), ("2^-1", "1/2"), ("3(4+1)", "15"),
    ("(10^60)^(1/3)", "10^20"), ("\\pi", "pi"), ("19/6", "\\frac{19}{6}"), ("1,000", "1000"), ("yes", "yes"),
])
def test_math_right(answer, truth):
    assert math_(answer, truth) == 1.0


@pytest.mark.parametrize("answer,truth", [
    ("1/3", "0.3333333333"), ("x+2", "x+1"), ("2y", "2x"), ("\\frac{1}{3}", "1/2"), ("no", "yes"),
    ("3.14", "\\pi"), ("(", "1"), ("1+", "1"), ("", "1"), ("{}", "1"), ("\\frac{1}", "1"),
])
def test_math_wrong_or_malformed(answer, truth):
    assert math_(answer, truth) == 0.0


HOSTILE = [
    "__import__('os').system('touch /tmp/pwned')",  # parse_expr would eval this
    "lambda: 1", "x.__class__", "exec('1')",
    "9^9^9^9", "10^1000*10^1000*10^1000", "2^(10^10)", "(x+9)^(x+9)^(x+9)^(x+9)^(x+9)", "x^x^x^x^x^x^x^x^x^x",
    "9" * 5000, "1e999999999", "(" * 5000 + "1" + ")" * 5000, "(" * 200 + "1" + ")" * 200,
    "\\sqrt{" * 100 + "2" + "}" * 100, "-" * 400 + "1",
    "nan", "NaN", "inf", "-inf", "1/0", "0/0", "0^-1", "(-8)^(1/3)",
    "١٢", "１２", "²", "\u200b12", "1\x002", "\U0001f600",
]


@pytest.mark.parametrize("verify", [exact, numeric, math_], ids=["exact", "numeric", "math"])
@pytest.mark.parametrize("answer", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_answers_score_zero_and_never_raise(verify, answer):
    assert verify(answer, "12") == 0.0
    assert verify(answer, "\\frac{1}{2}") == 0.0


def test_unicode_digits_are_not_numbers():
    # float("١٢") is 12.0 and "²".isdigit() is True: only ASCII digits are read, so they score 0.
    assert numeric("١٢", "12") == 0.0 and math_("١٢", "12") == 0.0


# ---- custom verifiers by dotted path ---------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(textwrap.dedent("""
        def lower(answer, truth):
            return answer.lower() == truth.lower()
        def boom(answer, truth):
            raise RuntimeError("bad day")
        def nan(answer, truth):
            return float("nan")
        def big(answer, truth):
            return 7
        def text(answer, truth):
            return "yes"
        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_checks"
    sys.modules.pop("my_checks", None)


def test_a_custom_verifier_by_dotted_path(user_module):
    v = get_verifier(f"{user_module}:lower")
    assert v("PARIS", "paris") == 1.0 and v("Rome", "paris") == 0.0


@pytest.mark.parametrize("fn", ["boom", "nan", "text"])
def test_a_custom_verifier_that_misbehaves_scores_zero(user_module, fn):
    assert get_verifier(f"{user_module}:{fn}")("a", "a") == 0.0


def test_a_custom_score_is_clipped_to_one(user_module):
    assert get_verifier(f"{user_module}:big")("a", "a") == 1.0


@pytest.mark.parametrize("path,says", [
    ("fuzzy", "not a dotted path 'module:function'"),
    ("no_such_module_xyz:check", "cannot import 'no_such_module_xyz'"),
    ("my_checks:missing", "has no function 'missing'"),
    ("my_checks:not_callable", "has no function 'not_callable'"),
    (":check", "not a dotted path"),
])
def test_a_bad_verifier_name_is_one_clear_line(user_module, path, says):
    with pytest.raises(VerifierError) as e:
        get_verifier(path)
    assert says in str(e.value) and "\n" not in str(e.value)

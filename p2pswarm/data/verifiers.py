"""Answer verifiers for text datasets: `exact`, `numeric`, `math`, or a user's function by dotted path.

A verifier is `verify(answer, truth) -> float` in [0, 1]: `answer` is what a completion put inside its last
<answer>...</answer> (a policy's output, or a swarm peer's: untrusted), `truth` the dataset's answer. Every
verifier returned by `get_verifier` never raises and never hangs: it scores 0 for anything it cannot read.

- `exact`: equal after collapsing whitespace (case-sensitive).
- `numeric`: both read as numbers (ASCII digits; `1,234`, `-3.5`, `1e-3`, `3/4`) and equal within a
  relative and absolute tolerance. NaN and infinities never match.
- `math`: both read as expressions (numbers, + - * / ^, parentheses, single-letter variables, pi, sqrt,
  and the LaTeX that answers use: \\frac, \\sqrt, \\cdot, \\times, \\boxed, $...$) and equal: identical
  after sympy's canonical form, else equal in value at a few points. Reading is our own tokenizer and
  parser building sympy objects, never sympy's `parse_expr` (which calls eval: `__import__` in an answer
  would run). sympy's work is bounded by the input length, nesting depth, literal sizes and the size of
  exact powers; values are compared with Python floats walking the expression, which cannot hang.
  Answers that are not expressions (words, lists) still match by `exact`.
- `module:function`: a user's `function(answer, truth)`, imported once; its exceptions, non-numbers and
  out-of-range values score 0 (and are logged once). Its running time is the user's responsibility.
"""

from __future__ import annotations

import importlib
import logging
import math
import random
import re
from collections.abc import Callable
from typing import Any

from p2pswarm.errors import UserError

log = logging.getLogger(__name__)

Verifier = Callable[[str, str], float]
NAMES = ("exact", "numeric", "math")

MAX_ANSWER = 512  # characters of an answer a verifier reads at all; a longer one scores 0
MAX_DEPTH = 32  # nesting of parentheses, powers and functions in a math answer
MAX_LITERAL = 60  # digits of one number in a math answer
MAX_EXPONENT = 1000  # |exponent| of a power in a math answer
MAX_DIGITS = 2000  # digits an exact power may have (beyond, sympy's integer arithmetic gets slow)
REL_TOL = 1e-9  # the math verifier's value comparison
POINTS = 3  # values tried for the variables of a math answer


class VerifierError(UserError, ValueError):
    pass


# ---- exact -----------------------------------------------------------------------------------------------
def squash(s: str) -> str:
    return " ".join(s.split())


def exact(answer: str, truth: str) -> float:
    return 1.0 if squash(answer) == squash(truth) else 0.0


# ---- numeric ---------------------------------------------------------------------------------------------
# [0-9], not \d: \d also matches other scripts' digits ("١٢", "²"), which int() and float() read differently.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FRACTION = re.compile(r"([+-]?[0-9]+)\s*/\s*([0-9]+)")
_THOUSANDS = re.compile(r"(?<![0-9.])([0-9]{1,3}(?:,[0-9]{3})+)(?![0-9])")


def _ungroup(s: str) -> str:
    """1,234,567 -> 1234567 (a comma between other digits stays: "1,2" is a list)."""
    return _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)


def read_number(s: str) -> float | None:
    """A finite float from a plain number or an integer fraction, else None."""
    s = _ungroup(s.strip().strip("$").strip())
    if len(s) > 100:
        return None
    try:
        if _NUMBER.fullmatch(s):
            x = float(s)
        elif (m := _FRACTION.fullmatch(s)) and int(m.group(2)) != 0:
            x = int(m.group(1)) / int(m.group(2))
        else:
            return None
    except (ValueError, OverflowError):  # a fraction of two 100-digit integers overflows a float
        return None
    return x if math.isfinite(x) else None


def numeric(tolerance: float = 1e-6) -> Verifier:
    def verify(answer: str, truth: str) -> float:
        a, t = read_number(answer), read_number(truth)
        if a is None or t is None:
            return 0.0
        return 1.0 if math.isclose(a, t, rel_tol=tolerance, abs_tol=tolerance) else 0.0

    return verify


# ---- math ------------------------------------------------------------------------------------------------
class _Unreadable(Exception):
    pass


_LATEX_DROP = re.compile(r"\\left|\\right|\\[,;:! ]|\\displaystyle")
_LATEX_SUBS = (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
               ("**", "^"))
_TOKEN = re.compile(r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)|(?P<fn>\\frac|\\sqrt|sqrt)|(?P<pi>\\pi|pi)"
                    r"|(?P<sym>[A-Za-z])|(?P<op>[-+*/^(){}]))")
_ATOM_START = ("num", "fn", "pi", "sym", "(", "{")


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    for _ in range(4):  # "$\boxed{3}$", "\boxed{$3$}"...
        before = s
        s = s.strip().strip("$").strip()
        if s.startswith("\\boxed{") and s.endswith("}"):
            s = s[len("\\boxed{"):-1]
        if before == s:
            break
    s = _LATEX_DROP.sub("", s)
    for a, b in _LATEX_SUBS:
        s = s.replace(a, b)
    if re.match(r"[A-Za-z]\s*=", s):  # "x = 5": the value
        s = s.split("=", 1)[1]
    return _ungroup(s)


def _tokens(s: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None or m.end() == pos:
            if s[pos:].strip() == "":
                break
            raise _Unreadable(f"unexpected {s[pos]!r}")
        kind = m.lastgroup
        value = m.group(kind)
        out.append((value if kind == "op" else kind, value))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over the tokens, building sympy objects with the size guards of the module doc."""

    def __init__(self, tokens: list[tuple[str, str]], sp: Any):
        self.t, self.i, self.sp, self.depth = tokens, 0, sp, 0

    def parse(self):
        if not self.t:
            raise _Unreadable("empty")
        e = self.expr()
        if self.i != len(self.t):
            raise _Unreadable(f"unexpected {self.t[self.i][1]!r}")
        return e

    def peek(self) -> str | None:
        return self.t[self.i][0] if self.i < len(self.t) else None

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            raise _Unreadable(f"expected {kind}")
        self.i += 1
        return self.t[self.i - 1][1]

    def nest(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Unreadable("nested too deep")

    def expr(self):
        self.nest()
        e = self.term()
        while self.peek() in ("+", "-"):
            op = self.take(self.peek())
            rhs = self.term()
            e = e + rhs if op == "+" else e - rhs
        self.depth -= 1
        return e

    def term(self):
        e = self.unary()
        while True:
            k = self.peek()
            if k in ("*", "/"):
                self.i += 1
                rhs = self.unary()
                e = e * rhs if k == "*" else e / rhs
            elif k in _ATOM_START and k != "num":  # implicit product: 2x, 2\sqrt{3}, 3(4+1)
                e = e * self.power()
            else:
                return e

    def unary(self):
        if self.peek() in ("+", "-"):
            op = self.take(self.peek())
            self.nest()
            e = self.unary()
            self.depth -= 1
            return -e if op == "-" else e
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() != "^":
            return base
        self.i += 1
        self.nest()
        exp = self.unary()  # right-associative: 2^3^2 = 2^9
        self.depth -= 1
        return self.pow(base, exp)

    def pow(self, base, exp):
        if exp.is_number:
            e = _value(exp)
            if e is None or abs(e) > MAX_EXPONENT:
                raise _Unreadable("exponent too large")
            if base.is_number:
                b = _value(base)
                if b is None:
                    raise _Unreadable("not a finite number")
                if abs(b) == 0 and complex(e).real < 0:
                    raise _Unreadable("division by zero")
                if abs(b) != 0 and abs(e) * abs(math.log10(abs(b))) > MAX_DIGITS:
                    raise _Unreadable("power too large")
        return self.sp.Pow(base, exp)

    def atom(self):
        k = self.peek()
        sp = self.sp
        if k == "num":
            v = self.take("num")
            if len(v.replace(".", "")) > MAX_LITERAL:
                raise _Unreadable("number too long")
            return sp.Rational(v)
        if k == "pi":
            self.i += 1
            return sp.pi
        if k == "sym":
            return sp.Symbol(self.take("sym"))
        if k in ("(", "{"):
            self.i += 1
            e = self.expr()
            self.take(")" if k == "(" else "}")
            return e
        if k == "fn":
            name = self.take("fn")
            self.nest()
            if name == "\\frac":
                num, den = self.atom(), self.atom()
                if den.is_number and _value(den) == 0:
                    raise _Unreadable("division by zero")
                e = num / den
            else:
                e = self.pow(self.atom(), sp.Rational(1, 2))
            self.depth -= 1
            return e
        raise _Unreadable(f"unexpected {self.t[self.i][1] if k else 'end'!r}")


def _value(e, at: dict | None = None) -> complex | None:
    """The value of a sympy expression as a Python complex (variables from `at`), or None when it is not
    finite. Python floats overflow to an error instead of growing, so this is linear in the tree's size."""
    try:
        v = _walk(e, at or {})
    except (OverflowError, ZeroDivisionError, ValueError, TypeError):
        return None
    if not (math.isfinite(v.real) and math.isfinite(v.imag)):
        return None
    return v.real if v.imag == 0 else v


def _walk(e, at: dict) -> complex:
    import sympy as sp

    if e.is_Integer or e.is_Rational:
        return complex(int(e.p) / int(e.q))
    if e.is_Float:
        return complex(float(e))
    if e is sp.pi:
        return complex(math.pi)
    if e is sp.E:
        return complex(math.e)
    if e is sp.I:
        return 1j
    if e.is_Symbol:
        return at.get(e.name, complex(math.nan))
    if e.is_Add:
        return sum((_walk(a, at) for a in e.args), complex(0))
    if e.is_Mul:
        out = complex(1)
        for a in e.args:
            out *= _walk(a, at)
        return out
    if e.is_Pow:
        b, x = _walk(e.args[0], at), _walk(e.args[1], at)
        if b == 0 and x.real < 0:
            raise ZeroDivisionError
        r = b ** x
        if abs(r) > 1e300:
            raise OverflowError
        return r
    raise ValueError(f"cannot evaluate {type(e).__name__}")


def read_math(s: str):
    """A sympy expression from an answer string, or None when it is not one this verifier reads."""
    import sympy as sp

    if len(s) > MAX_ANSWER:
        return None
    try:
        e = _Parser(_tokens(_strip_wrappers(s)), sp).parse()
    except (_Unreadable, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None
    if e.is_number and _value(e) is None:
        return None  # 1/0, 0/0, or too large for a float: nothing to compare
    return e


def math_equal(answer: str, truth: str) -> float:
    if exact(answer, truth):
        return 1.0
    a, t = read_math(answer), read_math(truth)
    if a is None or t is None:
        return 0.0
    if a == t:  # sympy's canonical forms agree: sqrt(8) and 2*sqrt(2), 1/2 and 0.5
        return 1.0
    if a.is_Rational and t.is_Rational:
        return 0.0  # exact and different: 1/3 is not 0.3333333333
    names = sorted({s.name for s in a.free_symbols | t.free_symbols})
    rng = random.Random(0)  # the same points every time: a score never depends on luck
    points = [{n: complex(rng.uniform(0.5, 1.5)) for n in names} for _ in range(POINTS if names else 1)]
    for at in points:
        x, y = _value(a, at), _value(t, at)
        if x is None or y is None or abs(x - y) > REL_TOL * max(1.0, abs(y)):
            return 0.0
    return 1.0


# ---- by name -------------------------------------------------------------------------------------------
def load_custom(path: str) -> Verifier:
    """The function `module:function` names; VerifierError, one line, when it cannot be had."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise VerifierError(f"verifier {path!r} is none of {', '.join(NAMES)} and not a dotted path 'module:function'")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or the module's own error at import
        raise VerifierError(f"verifier {path!r}: cannot import {module!r} ({type(e).__name__}: {e})") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise VerifierError(f"verifier {path!r}: {module!r} has no function {attr!r}")
    return fn


def guarded(fn: Callable[[str, str], Any], name: str) -> Verifier:
    """`fn` made total: a float in [0, 1], 0 for an error or a value that is not a finite number."""
    complained: list[str] = []

    def verify(answer: str, truth: str) -> float:
        if not isinstance(answer, str) or len(answer) > MAX_ANSWER:
            return 0.0
        try:
            v = fn(answer, truth)
            if isinstance(v, bool):
                v = float(v)
            if type(v) not in (int, float) or not math.isfinite(v):
                raise TypeError(f"returned {type(v).__name__} {v!r:.40}, not a finite number")
        except Exception as e:  # noqa: BLE001 - a verifier never takes a round down
            if not complained:
                complained.append(name)
                log.warning("verifier %s failed (scored 0; said once): %s: %s", name, type(e).__name__, e)
            return 0.0
        return min(max(float(v), 0.0), 1.0)

    verify.__name__ = f"verify_{name}"
    return verify


def get_verifier(name: str, tolerance: float = 1e-6) -> Verifier:
    """The verifier `name` names (module doc); VerifierError for a dotted path that does not load."""
    if name == "exact":
        fn: Callable = exact
    elif name == "numeric":
        fn = numeric(tolerance)
    elif name == "math":
        fn = math_equal
    else:
        fn = load_custom(name)
    return guarded(fn, name)

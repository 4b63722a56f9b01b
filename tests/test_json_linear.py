"""validate.json_value on hostile documents at the size cap: every Drive registration, clock file, manifest
and fork row goes through it before anything else reads the bytes, so its pre-pass (the nesting bound) must
take time linear in the document whatever it holds. The old pre-pass, a regex stripping string literals,
was quadratic on a literal that never closes: '"' + '\\"' * n took 33 s at 80 KB and about 95 minutes at
the 1 MiB cap.

No test times anything: each hostile document runs under a generous alarm (DEADLINE seconds), which only
a super-linear pre-pass (a hang, at this size) sets off. The nesting bound itself is checked against the
pattern it replaced, on small inputs, so that no valid document changes its answer."""

from __future__ import annotations

import json
import random
import re
import signal
import time
from contextlib import contextmanager

import pytest

from p2pswarm import validate as V
from p2pswarm.comm.drive.store import MAX_JSON_BYTES, parse_json

DEADLINE = 20  # seconds for one MiB-sized document: the linear scan takes well under one on a loaded CPU
CAP = MAX_JSON_BYTES


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    """Fail (raise Hang) if the block runs past `seconds`; pytest-timeout's own alarm is put back after."""
    def ring(signum, frame):
        raise Hang(f"still running after {seconds} s: not linear")

    old_handler = signal.signal(signal.SIGALRM, ring)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 0.001), old_interval)


def refusal(doc) -> str:
    """json_value's refusal (the text of its Invalid); fails the test if the document is accepted."""
    with deadline(DEADLINE):
        try:
            V.json_value(doc)
        except V.Invalid as e:
            return str(e)
    pytest.fail("a hostile document was accepted")


def fill(prefix: str, unit: str, suffix: str = "", size: int = CAP) -> str:
    """prefix + unit repeated + suffix, as close to `size` bytes (UTF-8) as the unit allows."""
    n = (size - len(prefix.encode()) - len(suffix.encode())) // len(unit.encode())
    doc = prefix + unit * n + suffix
    assert size - len(unit.encode()) < len(doc.encode()) <= size
    return doc


# ---- hostile documents at the cap: refused the documented way, and in linear time --------------------------
NOT_JSON = "json: is not JSON"
TOO_DEEP = f"json: nests deeper than {V.JSON_MAX_DEPTH}"

HOSTILE = {
    # a literal that never closes, full of escaped quotes: each of them opened a new, doomed regex match
    "escaped quotes": (fill('"', '\\"'), NOT_JSON),
    "escaped quotes in a value": (fill('{"a": "', '\\"'), NOT_JSON),
    "escaped quotes, bytes": (fill('"', '\\"').encode(), NOT_JSON),
    "escaped quotes, then a backslash and newline": (fill('"', '\\"', '\\\n"'), NOT_JSON),
    "a run of backslashes": (fill('"', "\\"), NOT_JSON),
    "a run of backslashes, closed": ('"' + "\\" * (CAP - 3) + '"', NOT_JSON),  # odd: the last quote is escaped
    "backslash-newline pairs": (fill('"', "\\\n"), NOT_JSON),
    "quotes only": (fill("", '"'), NOT_JSON),
    "unterminated strings, one after another": (fill("", '"\\"a\\\n'), NOT_JSON),
    "an unterminated string with brackets": (fill('"', '\\"[{'), TOO_DEEP),  # a broken literal's brackets count
    "deep nesting": (fill("", "["), TOO_DEEP),
    "deep nesting of objects": (fill("", '{"a":'), TOO_DEEP),
    "deep nesting between strings": (fill("", '["\\"",'), TOO_DEEP),
    "brackets that never open": (fill("", "]}"), NOT_JSON),
    "a long flat list": (fill("[", "[],", "]"), NOT_JSON),  # trailing comma
    "NaN in a big list": (fill("[", "1,", "NaN]"), NOT_JSON),
}


@pytest.mark.parametrize("doc, why", HOSTILE.values(), ids=list(HOSTILE))
def test_a_hostile_document_at_the_cap_is_refused_without_hanging(doc, why):
    assert refusal(doc).startswith(why)


@pytest.mark.parametrize("doc", [HOSTILE[k][0] for k in ("escaped quotes", "a run of backslashes", "deep nesting")],
                         ids=["escaped quotes", "a run of backslashes", "deep nesting"])
def test_a_drive_file_at_the_cap_is_dropped_without_hanging(doc):
    """The path a Drive registration, clock or manifest takes: the store's parser says None, never raises."""
    with deadline(DEADLINE):
        assert parse_json(doc.encode()) is None


def test_valid_documents_at_the_cap_are_read_in_linear_time():
    text = "a \\\"quoted\\\" [line]\\n{with} brackets\\\\ " * 40
    rows = []
    while len(json.dumps(rows)) < CAP - 4096:
        rows.append({"name": f"peer{len(rows)}", "text": text, "xs": [1, 2.5, {"b": [None, True]}]})
    doc = json.dumps(rows)
    deep = "[" * V.JSON_MAX_DEPTH + "]" * V.JSON_MAX_DEPTH  # exactly the bound: allowed
    brackets_in_a_string = json.dumps({"s": "[" * (CAP - 16)})  # not nesting: inside a literal
    escapes = json.dumps(["\\" * 1000, '"' * 1000] * 200)
    with deadline(DEADLINE):
        assert V.json_value(doc) == rows
        assert V.json_value(doc.encode()) == rows
        assert V.json_value(deep) == json.loads(deep)
        assert V.json_value(brackets_in_a_string)["s"] == "[" * (CAP - 16)
        assert V.json_value(escapes) == json.loads(escapes)
        assert parse_json(json.dumps({"name": "n", "rows": rows}).encode())["rows"] == rows
    with pytest.raises(V.Invalid, match="nests deeper"):
        V.json_value("[" * (V.JSON_MAX_DEPTH + 1) + "]" * (V.JSON_MAX_DEPTH + 1))


def test_json_value_refuses_what_is_not_text():
    for bad in (None, 12, ["[]"], b"\xff[]"):
        with pytest.raises(V.Invalid):
            V.json_value(bad)


# ---- the nesting bound is the one the regex pre-pass computed, on every input -------------------------------
_OLD_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OLD_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def old_depth(text: str) -> int:
    """The replaced pre-pass (quadratic, so only for small inputs): strip literals, count brackets."""
    depth = deepest = 0
    for c in _OLD_NOT_BRACKET.sub("", _OLD_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def test_the_nesting_bound_equals_the_replaced_pre_pass():
    rng = random.Random(20240611)  # the same inputs every run
    alphabet = ['"', "\\", "[", "]", "{", "}", "\n", "a", " ", ",", ":", "é"]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert V.json_depth(text, limit=10**9) == old_depth(text), repr(text)
    for text in ['"\\"[', '"\\\n"[', '"a\\', '"[" [', '["\\\\"]', '"\\\n[', '"x\\"]"[', '{"a":["\\u005b"]}']:
        assert V.json_depth(text, limit=10**9) == old_depth(text), repr(text)

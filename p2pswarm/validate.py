"""Field checkers for everything that arrives from another peer: payloads, DHT records, Drive files,
torch.distributed headers, payload requests. One place for what "a valid field" means, so that every
parser says it the same way.

Each checker takes an untrusted value and returns it typed (an int, a finite float, a bounded string...)
or raises `Invalid`. A parser built from them therefore hands on only values that are safe for
arithmetic, `int()`, formatting, sorting and dict keys. Parsers of untrusted input catch `Invalid`
(and, as a last line, any other exception: see `refusal`) and drop the item; they never raise into a
round.

The limits, and why:
    integers    [-1, 2**31): rounds, stages, counts, sizes; -1 is "none yet" (finished = -1). Python ints
                are unbounded: 10**400 would overflow float() and int64 tensors, and a round of 2**62
                would send a follower's clock where it never comes back from.
    reals       finite, within a window per field: NaN compares false with everything (a NaN heartbeat
                looks fresh forever) and inf overflows `int(x * 1000)`.
    timestamps  wall-clock seconds in [2020-01-01, now + TIME_AHEAD]: a heartbeat "from the future"
                would keep a peer live for as long as it is ahead.
    names       1..64 printable characters (no control, format or separator characters but the space):
                they reach logs, the status table and the TUI, where an escape sequence would rewrite
                the terminal.
    text        bounded length; any character (questions and completions are free text).
    bools       real bools: `bool("no")` is True.
    enums       one of a fixed set of strings.
    peer ids    the libp2p id of an Ed25519 key (`12D3KooW` + 44 base58 characters, decoding to one).
    plain data  maps with string keys, lists, strings, bools, None, ints in int64, finite floats, at most
                MAX_DEPTH deep: what metadata and recipes may hold.
    JSON        at most JSON_MAX_DEPTH deep, checked before the parser runs (json_value): the parser's own
                guard is the process's recursion limit, which libraries may raise until it segfaults. The
                check is one linear pass (json_depth): a backtracking regex there was quadratic on a string
                that never closes, minutes of CPU for one hostile file at the 1 MiB cap.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Callable, Iterable

import base58

INT_MAX = 2**31  # exclusive
INT_MIN = -1
TIME_MIN = 1_577_836_800.0  # 2020-01-01 00:00 UTC: no p2pswarm record is older
TIME_AHEAD = 600.0  # how far a peer's clock may run ahead of ours (hivemind peers are held to 3 s at start)
NAME_MAX = 64
MAX_DEPTH = 8
_INT64 = 2**63

_PEER_ID = re.compile(r"12D3KooW[1-9A-HJ-NP-Za-km-z]{44}")
_ED25519_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])  # identity multihash of an Ed25519 public key
_HEX = re.compile(r"[0-9a-f]*")


class Invalid(ValueError):
    """A field that is missing, of the wrong type, or out of its range. `reason` is a short counter name."""

    def __init__(self, field: str, why: str, reason: str = "malformed"):
        super().__init__(f"{field}: {why}")
        self.field = field
        self.reason = reason


def integer(v: Any, field: str, lo: int = INT_MIN, hi: int = INT_MAX) -> int:
    """An int (not a bool) in [lo, hi)."""
    if type(v) is not int:  # bool is an int subclass; numpy and other int-likes are not on any wire
        raise Invalid(field, f"not an integer ({type(v).__name__})")
    if not lo <= v < hi:
        raise Invalid(field, f"{clip(v)} outside [{lo}, {hi})")
    return v


def real(v: Any, field: str, lo: float, hi: float) -> float:
    """A finite int or float (not a bool) in [lo, hi], as a float."""
    if type(v) not in (int, float):
        raise Invalid(field, f"not a number ({type(v).__name__})")
    if type(v) is int and not -_INT64 <= v < _INT64:
        raise Invalid(field, "integer too large")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise Invalid(field, f"{clip(v)} outside [{lo}, {hi}]")
    return f


def timestamp(v: Any, field: str, now: float | None = None, ahead: float = TIME_AHEAD) -> float:
    """Wall-clock seconds in [TIME_MIN, now + ahead]."""
    return real(v, field, TIME_MIN, (time.time() if now is None else now) + ahead)


def flag(v: Any, field: str) -> bool:
    if type(v) is not bool:
        raise Invalid(field, f"not a bool ({type(v).__name__})")
    return v


def text(v: Any, field: str, max_len: int, *, min_len: int = 0) -> str:
    """Any string of min_len..max_len characters."""
    if type(v) is not str:
        raise Invalid(field, f"not a string ({type(v).__name__})")
    if not min_len <= len(v) <= max_len:
        raise Invalid(field, f"{len(v)} characters, not {min_len}..{max_len}", "too_large" if len(v) > max_len else "malformed")
    return v


def name(v: Any, field: str, max_len: int = NAME_MAX) -> str:
    """A display name or identifier: 1..max_len printable characters (str.isprintable: no control, format,
    surrogate or separator character but the plain space)."""
    s = text(v, field, max_len, min_len=1)
    if not s.isprintable():
        raise Invalid(field, "has control or format characters")
    return s


def choice(v: Any, field: str, options: Iterable[str]) -> str:
    if type(v) is not str or v not in options:
        raise Invalid(field, f"{clip(v)} is not one of {sorted(options)}")
    return v


def blob(v: Any, field: str, size: int) -> bytes:
    """Bytes of exactly `size`."""
    if type(v) is not bytes or len(v) != size:
        raise Invalid(field, f"not {size} bytes")
    return v


def hex_bytes(v: Any, field: str, size: int) -> bytes:
    """A lowercase hex string of exactly `size` bytes."""
    if type(v) is not str or len(v) != 2 * size or not _HEX.fullmatch(v):
        raise Invalid(field, f"not {size} bytes of lowercase hex")
    return bytes.fromhex(v)


def public_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 public key an `12D3KooW...` peer id encodes; ValueError for any other peer id."""
    raw = base58.b58decode(peer_id)
    if len(raw) != len(_ED25519_PREFIX) + 32 or not raw.startswith(_ED25519_PREFIX):
        raise ValueError(f"{peer_id[:16]}... is not an Ed25519 peer id")
    return raw[len(_ED25519_PREFIX):]


def peer_id(v: Any, field: str) -> str:
    """A libp2p peer id of an Ed25519 key (what every p2pswarm identity is)."""
    if type(v) is not str or not _PEER_ID.fullmatch(v):
        raise Invalid(field, "not an Ed25519 peer id")
    try:
        public_from_peer_id(v)
    except ValueError:
        raise Invalid(field, "not an Ed25519 peer id") from None
    return v


def mapping(v: Any, field: str) -> dict:
    """A dict whose keys are all strings."""
    if type(v) is not dict or not all(type(k) is str for k in v):
        raise Invalid(field, "not a map with string keys")
    return v


def plain(v: Any, field: str, depth: int = MAX_DEPTH, *, blobs: bool = False) -> Any:
    """Plain data (see the module doc), returned as is; `blobs`: bytes allowed too. Anything else (a msgpack
    ExtType, a tuple, an object) is refused."""
    stack = [(v, 0)]
    while stack:
        x, d = stack.pop()
        t = type(x)
        if x is None or t in (bool, str) or blobs and t is bytes:
            continue
        if t is int:
            if not -_INT64 <= x < _INT64:
                raise Invalid(field, "integer outside int64")
        elif t is float:
            if not math.isfinite(x):
                raise Invalid(field, "non-finite number")
        elif t in (list, dict):
            if d >= depth:
                raise Invalid(field, f"nested deeper than {depth}")
            if t is dict:
                if not all(type(k) is str for k in x):
                    raise Invalid(field, "map key that is not a string")
                stack.extend((y, d + 1) for y in x.values())
            else:
                stack.extend((y, d + 1) for y in x)
        else:
            raise Invalid(field, f"holds a {t.__name__}")
    return v


_MISSING = object()


JSON_MAX_DEPTH = 64  # the deepest file of ours or the fork's nests about 6 levels
# What json_depth looks for: outside a string, a quote or a bracket; inside one, its end or an escape.
_OUTSIDE = re.compile(r'["\[\]{}]')
_INSIDE = re.compile(r'["\\]')
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str, limit: int = JSON_MAX_DEPTH) -> int:
    """The deepest nesting of brackets ([ and {) outside JSON string literals; Invalid as soon as it passes
    `limit`. One pass, linear in len(text) whatever the text holds: it runs on untrusted documents of up to
    a MiB, before the parser (json_value).

    A string literal is a quote, then characters and two-character escapes (a backslash and any character
    but a newline), then a quote. A quote that opens no such literal (the text ends first, or a backslash
    is followed by a newline or by nothing) is an ordinary character, and so is everything up to where its
    literal broke off: the brackets there count. That is exactly what the pattern this replaces,
    r'"(?:[^"\\\\]|\\\\.)*"' applied with re.sub, stripped, without re-trying a broken literal from each of
    its escaped quotes (which is what made it quadratic: '"' + '\\\\"' * n took minutes at a MiB): those
    fail where the first did, so the scan goes on from there. A closing bracket with nothing open counts
    down (depth below zero); the parser refuses such a document anyway."""
    n = len(text)
    depth = deepest = 0
    pos = 0
    while True:
        m = _OUTSIDE.search(text, pos)
        if m is None:
            return deepest
        start = m.start()
        if text[start] != '"':
            depth += 1 if text[start] in "[{" else -1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    raise Invalid("json", f"nests deeper than {limit}")
            pos = start + 1
            continue
        # A string literal opens at `start`: find its closing quote, stepping over escapes.
        i, closed = start + 1, False
        while True:
            m = _INSIDE.search(text, i)
            if m is None:  # the text ends inside the literal
                i = n
                break
            i = m.start()
            if text[i] == '"':
                closed = True
                break
            if i + 1 >= n or text[i + 1] == "\n":  # a backslash that escapes nothing: the literal breaks here
                break
            i += 2
        if closed:
            pos = i + 1
            continue
        # No literal: its quote and what follows up to the break are ordinary characters (text[i], if
        # any, is the backslash, which is neither a quote nor a bracket).
        for b in _BRACKET.finditer(text, start + 1, i):
            depth += 1 if b.group() in "[{" else -1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    raise Invalid("json", f"nests deeper than {limit}")
        pos = i


def json_value(data: bytes | str, *, nan: bool = False) -> Any:
    """A JSON document from an untrusted source, or Invalid. Nesting is bounded BEFORE the parser runs:
    json's C scanner recurses on the machine stack, guarded only by sys.getrecursionlimit(), which some
    libraries raise process-wide (py_ecc, imported by py-evm, sets it to 100000), and then a few hundred
    KB of brackets crash the interpreter instead of raising. NaN / Infinity are refused unless `nan`."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError:
        raise Invalid("json", "is not UTF-8") from None
    if type(text) is not str:
        raise Invalid("json", f"is not text ({type(data).__name__})")
    json_depth(text)
    try:
        return json.loads(text) if nan else json.loads(text, parse_constant=_no_json_constant)
    except (ValueError, RecursionError) as e:
        raise Invalid("json", f"is not JSON ({type(e).__name__})") from None


def _no_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def field(d: dict, key: str, check: Callable[..., Any], *args: Any, default: Any = _MISSING) -> Any:
    """`check(d[key], key, *args)`; `default` when the key is absent and a default is given."""
    if type(d) is not dict:
        raise Invalid(key, "not in a map")
    if key not in d:
        if default is _MISSING:
            raise Invalid(key, "missing")
        return default
    return check(d[key], key, *args)


def clip(v: Any, n: int = 40) -> str:
    """A short, printable rendering of an untrusted value for a log line."""
    try:
        s = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"<{v.bit_length()}-bit int>"
    except Exception:  # noqa: BLE001 - a value whose repr fails is still shown
        s = f"<{type(v).__name__}>"
    s = s.encode("ascii", "backslashreplace").decode()
    return s if len(s) <= n else s[: n - 3] + "..."


def refusal(e: BaseException) -> str:
    """The counter name for an exception a parser caught: Invalid's own reason, else `malformed`."""
    return e.reason if isinstance(e, Invalid) else "malformed"

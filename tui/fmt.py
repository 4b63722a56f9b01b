"""Small formatting helpers shared by the widgets.

Strings the UI did not write itself (a peer's name from a heartbeat or a Drive registration, a dataset, a
question, a completion, a path, an error message, a setting the user typed) never reach Textual as a plain
str where it reads markup: a DataTable cell, Static.update(), a Label. Textual parses those as markup, and a
name such as `[/]` or `a[/b]` raises MarkupError, which ends the app (and the training thread with it);
`[link=...]` makes a hyperlink, `[$x]` or `[B]` swallow the text. `literal` turns such a string into a Text,
shown as it is; `markup` fills the UI's own markup with such strings as literal text. (textual.markup.escape
is not enough: it leaves `[$x]`, `[B]` and a run of three trailing backslashes to the parser.)

Both also show control characters as escapes (`\\x1b`): free text (a completion, a question) may hold any
character, and neither Rich nor Textual removes ESC, which would reach the terminal as an escape sequence;
nor the bidirectional overrides that make text read other than it is."""

from __future__ import annotations

import re
import time
from typing import Any

from rich.text import Text
from textual.content import Content

# C0 controls but tab and newline, DEL, C1 controls, and the bidirectional marks, embeddings and isolates.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match) -> str:
    c = ord(match.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def shown(value: Any) -> str:
    """str(value) with its control characters written as escapes (tab and newline kept)."""
    s = value if type(value) is str else str(value)
    return _CONTROL.sub(_visible, s)


def literal(value: Any, style: str = "") -> Text:
    """`value` as text shown as it is (str() of it, control characters as escapes), never read as markup."""
    return Text(shown(value), style=style, end="")


def markup(template: str, **values: Any) -> Content:
    """The UI's own markup `template` with each `$name` replaced by values[name] as literal text (`shown`)."""
    return Content.from_markup(template, **{k: shown(v) for k, v in values.items()})


def short_id(peer_id: str, n: int = 6) -> str:
    """The distinctive tail of a libp2p peer id (they all start with 12D3KooW)."""
    return "…" + peer_id[-n:] if len(peer_id) > n else peer_id


def num(x, spec: str = ".3f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def ago(t: float, now: float | None = None) -> str:
    if not t:
        return "–"
    s = max(0.0, (now or time.time()) - t)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def rate(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x / 1000:.1f}k" if x >= 10000 else f"{x:.0f}"

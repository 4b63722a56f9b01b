"""Small formatting helpers shared by the widgets."""

from __future__ import annotations

import time


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

"""The headless console: one log line per round (and per event a user cares about), a progress bar
while a single agent generates and trains."""

from __future__ import annotations

import logging
import sys
from collections import deque

from p2pswarm import events as ev
from p2pswarm.events import Event

log = logging.getLogger("p2pswarm")

AVG_WINDOW = 50  # one round's reward (32 samples) is noisy; the running mean shows the trend


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def round_line(m: dict, recent_mean: float | None = None) -> str:
    trend = f" avg{AVG_WINDOW} {recent_mean:.3f}" if recent_mean is not None else ""
    return (
        f"round {m['round']:>4} | reward {_f(m['reward_mean'])} (local {_f(m['reward_local_mean'])}, "
        f"swarm {_f(m['reward_swarm_mean'])}){trend} | loss {_f(m['loss'], '+.4f')} | groups {m['local_groups']} local "
        f"+ {m['swarm_groups']} swarm from {m['swarm_peers']} peers | {m['gen_tokens_per_s']:.0f} tok/s | "
        f"{m['round_seconds']:.2f} s"
        + (f" | eval {m['eval_reward']:.3f}" if "eval_reward" in m else "")
    )


class ConsolePrinter:
    def __init__(self, name: str, show_name: bool, progress_bar: bool | None = None):
        self.prefix = f"[{name}] " if show_name else ""
        self.bar_enabled = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._bar = None
        self._phase = None
        self._recent: deque[float] = deque(maxlen=AVG_WINDOW)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._phase = None

    def __call__(self, e: Event) -> None:
        d = e.data
        if e.kind == ev.PROGRESS:
            if not self.bar_enabled:
                return
            from tqdm import tqdm

            if self._phase != d["phase"]:
                self._close_bar()
                self._phase = d["phase"]
                unit = "tok" if d["phase"] == "generate" else "step"
                self._bar = tqdm(total=d["total"], desc=f"round {d['round']} {d['phase']}", unit=unit, leave=False)
            self._bar.n = d["done"]
            self._bar.refresh()
        elif e.kind == ev.ROUND_FINISHED:
            self._close_bar()
            if d.get("reward_local_mean") is not None:
                self._recent.append(d["reward_local_mean"])
            recent = sum(self._recent) / len(self._recent) if self._recent else None
            log.info("%s%s", self.prefix, round_line(d, recent))
        elif e.kind == ev.NODE_STARTED:
            log.info("%snode %s (peer %s) starting at round %d with model %s", self.prefix, d["name"], e.peer, d["first_round"], d["model"])
        elif e.kind == ev.RESUMED:
            log.info("%sresumed from %s", self.prefix, d["checkpoint"])
        elif e.kind == ev.ROUNDS_SKIPPED:
            log.info("%sskipped round(s) %s to follow the swarm", self.prefix, ev.span_text(d["first"], d["last"]))
        elif e.kind == ev.CHECKPOINT_SAVED:
            log.debug("%scheckpoint %s", self.prefix, d["path"])
        elif e.kind == ev.NODE_STOPPED:
            self._close_bar()
            log.info("%sstopped after round %d", self.prefix, d["round"])
        elif e.kind == ev.ERROR:
            self._close_bar()
            log.error("%s%s", self.prefix, d["message"])

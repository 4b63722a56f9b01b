"""A bench's runs as child processes, a few at a time (bench/sapo.py, hetero.py, learning.py).

Each run is one child process that writes its result as JSON to a path it is given; run_children() starts
them `parallel` at a time, hands each finished run's JSON to `on_done` (which saves it, so an interrupted
experiment resumes from what was recorded), counts the runs that failed, and terminates the children still
running if the parent stops.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Job = tuple[Any, str, Callable[[Path], list[str]]]  # (key for on_done, label to print, command given the output path)


def run_children(jobs: list[Job], parallel: int, on_done: Callable[[Any, dict, float], None], prefix: str,
                 poll_s: float = 1.0) -> int:
    """Run every job; on_done(key, result, seconds) for each that wrote its result. Returns how many failed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    todo = list(enumerate(jobs))
    running: list[tuple[subprocess.Popen, Any, str, Path, float]] = []
    failed = 0
    try:
        while todo or running:
            while todo and len(running) < max(1, parallel):
                i, (key, label, make_cmd) = todo.pop(0)
                out = tmp / f"run{i}.json"
                running.append((subprocess.Popen(make_cmd(out)), key, label, out, time.perf_counter()))
                print(f"  start {label}", flush=True)
            time.sleep(poll_s)
            for item in list(running):
                proc, key, label, out, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0 or not out.exists():
                    failed += 1
                    print(f"  FAILED {label} (exit {proc.returncode})", flush=True)
                    continue
                on_done(key, json.loads(out.read_text()), time.perf_counter() - t0)
                print(f"  ({len(todo)} queued, {len(running)} running)", flush=True)
    finally:
        for proc, *_ in running:
            proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return failed

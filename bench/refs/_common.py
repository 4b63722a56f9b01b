"""What the three trainer-speed workers share. Plain Python + torch only: each worker runs in its own
virtualenv (the project's, bench/.venv-genrl, bench/.venv-trl), so nothing here imports p2pswarm.

Protocol with bench/trainer_speed.py: the worker prints JSON lines on its stdout (everything libraries
print is sent to stderr), reads one command a line on stdin:
    -> {"event": "ready", ...}            after loading the model and building the trainer
    <- step                                 one generate + one train step
    -> {"event": "step", "gen_s": ..., "train_s": ..., ...}
    <- quit
    -> {"event": "done", "peak_rss_mb": ..., ...}
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time


class Channel:
    """JSON lines to the driver on the real stdout; fd 1 and sys.stdout are pointed at stderr, so a
    library's print() can never corrupt the protocol."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **obj) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def recv(self) -> str:
        line = sys.stdin.readline()
        return line.strip() or "quit"


def config() -> dict:
    return json.loads(sys.argv[1])


def prompts(cfg: dict) -> list[list[list[dict]]]:
    """[step][prompt] -> chat messages; the same prompts, in the same order, for every trainer."""
    with open(cfg["prompts_file"]) as f:
        return json.load(f)


def reward(seed: int, step: int, prompt: int, j: int) -> float:
    """Seeded uniform reward in [0, 1) for completion j of prompt `prompt` at step `step`: never all zero,
    never constant within a group, identical for every trainer. (The speed of scoring is not measured.)"""
    return random.Random(f"{seed}:{step}:{prompt}:{j}").random()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a worker would report the driver's
    # peak (the hardware probe's) whenever that is higher than its own. VmHWM belongs to this process's memory.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup_torch(cfg: dict):
    import torch

    torch.set_num_threads(cfg["threads"])
    if cfg.get("flush_denormal", True):
        torch.set_flush_denormal(True)
    return torch


class OptimizerSteps:
    """Counts optimizer.step() calls of every torch optimizer in the process (a global post-hook), so a
    trainer that silently skips its update is caught."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.count = 0
        register_optimizer_step_post_hook(self._hook)

    def _hook(self, *args, **kwargs) -> None:
        self.count += 1


class ParamWatch:
    """Did a step change the model's parameters? (snapshot before, compare after; not timed)"""

    def __init__(self, model) -> None:
        self.model = model
        self.before = None

    def snapshot(self) -> None:
        self.before = [p.detach().clone() for p in self.model.parameters()]

    def delta(self) -> float:
        return max(float((p.detach() - b).abs().max()) for p, b in zip(self.model.parameters(), self.before))


def completion_length(ids, eos: set[int]) -> int:
    """Tokens generated for one row: up to and including the first eos (padding after it not counted)."""
    for j, t in enumerate(ids):
        if int(t) in eos:
            return j + 1
    return len(ids)


def versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def step_record(gen_s: float, train_s: float, tokens: int, rows: int, longest: int, steps: int, delta: float) -> dict:
    return {
        "event": "step",
        "gen_s": gen_s,
        "train_s": train_s,
        "gen_tokens": tokens,
        "rows": rows,
        "longest": longest,
        "optimizer_steps": steps,
        "param_max_abs_delta": delta,
        "rss_mb": rss_mb(),
    }


now = time.perf_counter

"""Time of one round (generate + train) of the embedded policy, and generated tokens per second.

    python bench/round_time.py                 # 8 tasks x G=4, 2 warm-up + 10 timed rounds
    python bench/round_time.py --g 8 --rounds 20

Writes bench/results/round_time.json (append-only history of runs: one entry per invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import p2pswarm  # noqa: F401 - first: it sets OMP_WAIT_POLICY before torch loads
import torch

from p2pswarm import models
from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.node import configure_torch
from p2pswarm.rewards import ReasoningGymRewards
from p2pswarm.settings import load_settings
from p2pswarm.trainer import GRPOTrainer
from p2pswarm.types import GameState

RESULTS = Path(__file__).parent / "results" / "round_time.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the node's default)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    s = load_settings(model=args.model, device=args.device, threads=args.threads, num_generations=args.g, tasks_per_round=args.tasks,
                      local_groups=args.tasks, swarm_groups=0, max_new_tokens=args.max_new_tokens,
                      runs_dir=Path(tempfile.mkdtemp()))
    configure_torch(s)
    device = models.pick_device(s.device)
    model, tok = models.load(s.model, device, models.pick_dtype(s.dtype, device))
    trainer = GRPOTrainer(model, tok, s, device)
    data = ReasoningGymData(s.preset, seed=0, tasks_per_round=args.tasks)
    rewards = ReasoningGymRewards()
    gen_s, train_s, round_s, tok_s, trained = [], [], [], [], []
    for r in range(args.warmup + args.rounds):
        tasks = data.with_prompts(data.round_tasks(r))
        t0 = time.perf_counter()
        groups = trainer.generate(tasks)
        t1 = time.perf_counter()
        rewards.score(groups)
        state = GameState(r)
        state.add(0, groups, [])
        stats = trainer.train(state)
        t2 = time.perf_counter()
        if r >= args.warmup:
            gen_s.append(t1 - t0)
            train_s.append(t2 - t1)
            round_s.append(t2 - t0)
            tok_s.append(trainer.last_generate["tokens_per_s"])
            trained.append(stats.local_groups)
        print(f"round {r:3d}  generate {t1 - t0:6.3f}s  train {t2 - t1:6.3f}s  {trainer.last_generate['tokens_per_s']:7.0f} tok/s"
              f"  groups trained {stats.local_groups}{'  (warm-up)' if r < args.warmup else ''}")
    result = {
        "benchmark": "round_time",
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "torch": torch.__version__},
        "config": {"model": s.model, "tasks": args.tasks, "G": args.g, "max_new_tokens": args.max_new_tokens,
                   "num_iterations": s.num_iterations, "loss_type": s.loss_type},
        "rounds_timed": args.rounds,
        "median_round_seconds": statistics.median(round_s),
        "median_generate_seconds": statistics.median(gen_s),
        "median_train_seconds": statistics.median(train_s),
        "median_gen_tokens_per_s": statistics.median(tok_s),
        "mean_groups_trained": statistics.fmean(trained),
    }
    print(json.dumps(result, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        history = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        history.append(result)
        RESULTS.write_text(json.dumps(history, indent=2) + "\n")


if __name__ == "__main__":
    main()

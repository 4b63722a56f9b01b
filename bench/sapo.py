"""The SAPO experiment in miniature, measured like a paper would: does sharing rollouts help, and why?

N agents of the embedded policy in one process (the in-process swarm, `build_swarm` + `run_agents`: the
project's own round loop, exchange and trainer). An experiment is a grid of cells, and every cell is run on
the same paired seeds (same peer ids, hence the same tasks round by round, in every arm):

- regime: `default` (the default preset) or `sparse` (bench/presets/sparse.toml: starting reward about 0.05,
  as sparse as the paper's agents, whose mean reward per round was 0.035-0.07); `sparser` (starting near 0.02,
  bench/presets/sparser.toml) and `sparsest` (near 0.01, the paper's own mean reward level:
  bench/presets/sparsest.toml) only when asked for with --regimes;
- protocol (`selection`): `p2p` (flat groups dropped on both sides) or `paper` (only swarm groups filtered);
- agents: 4 or 8;
- arm: the I/J split 8/0 (no sharing), 6/2, 4/4, 2/6; `8/0+`, no sharing but more tasks per round so that
  an update has about as many groups with signal as 4/4's (it separates "sharing" from "bigger updates");
  `adaptive`, the budget I + J = 8 sized each round by `split=adaptive` (p2pswarm/selection.py).

Measured per round and agent: the mean sampled reward of its own rollouts (`reward_local_mean`), the groups
it trained on and how many carried signal, whether the update was skipped. Cumulative reward = sum over
rounds, averaged over agents. Each arm is compared to 8/0 of its cell seed by seed: mean paired gain and its
95% interval (Student t over seeds). CPU time is that of the training loop (all agents' threads).
Greedy held-out accuracy (200 tasks) before and after.

    python bench/sapo.py --quick      # 2 seeds x 10 rounds, both regimes, 8/0 4/4 adaptive: minutes
    python bench/sapo.py              # both regimes, p2p, 4 agents, 8/0 4/4 8/0+ adaptive, 3 seeds x 60 rounds:
                                      #   ~30 min on 2 idle cores, bench/results/sapo.*
    python bench/sapo.py --full       # the whole grid (both protocols, 4 and 8 agents, every arm), 300 rounds: hours
    python bench/sapo.py --plot-only  # remake summary, CSV and plot from the results file
    python bench/sapo.py --regimes sparse --arms 8/0,4/4 --seeds 5 --rounds 200   # any sub-grid

Every run is its own process (a crash loses one run) and is appended to the results JSON as soon as it
finishes; a rerun skips the runs already recorded, so an interrupted experiment resumes where it stopped.
Run it under `nice` on a shared machine: the load average is recorded with every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import run_children  # noqa: E402 - the child-process runner the benches share

RESULTS_DIR = Path(__file__).parent / "results"
PRESETS = {"sparse": Path(__file__).parent / "presets" / "sparse.toml",
           "sparser": Path(__file__).parent / "presets" / "sparser.toml",
           "sparsest": Path(__file__).parent / "presets" / "sparsest.toml"}
REGIMES = ("default", "sparse", "sparser", "sparsest")
MODE_REGIMES = ("default", "sparse")  # what the modes run; --regimes sparser / sparsest ask for the others
PROTOCOLS = ("p2p", "paper")
ARMS = ("8/0", "6/2", "4/4", "2/6", "8/0+", "adaptive")
BUDGET = 8  # I + J of every arm
# 8/0+'s tasks per round: about 4/4's groups with signal per update, at each regime's local signal rate
# (~0.53 default: 16 tasks -> min(8, 8.5); ~0.23 sparse: 24 tasks -> 5.5, 4/4 trains ~5.7).
MATCHED_TASKS = {"default": 16, "sparse": 24, "sparser": 32, "sparsest": 32}
# arXiv 2509.08721, 8 Qwen2.5-0.5B agents, 2000 rounds: cumulative reward per configuration.
PAPER = {"8/0": 561.79, "6/2": 854.43, "4/4": 1093.31, "2/6": 945.87}
MODES = {
    # name: (rounds, seeds, results stem, rolling window, regimes, protocols, agents, arms)
    "quick": (10, 2, "sapo_quick", 3, MODE_REGIMES, ("p2p",), (4,), ("8/0", "4/4", "adaptive")),
    "default": (60, 3, "sapo", 10, MODE_REGIMES, ("p2p",), (4,), ("8/0", "4/4", "8/0+", "adaptive")),
    "full": (300, 3, "sapo_full", 30, MODE_REGIMES, PROTOCOLS, (4, 8), ARMS),
}
# Two-sided 95% Student t quantiles by degrees of freedom (no scipy needed for the bench).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def seed_for(seed_index: int) -> int:
    """Settings seed of run `seed_index`; agent i uses seed + i, so runs must be further apart than the agents."""
    return 1000 * (seed_index + 1)


def arm_split(arm: str, regime: str, tasks: int) -> tuple[int, int, int, str]:
    """(I, J, tasks per round, split setting) of an arm."""
    if arm == "adaptive":
        return BUDGET // 2, BUDGET - BUDGET // 2, tasks, "adaptive"
    if arm == "8/0+":
        return BUDGET, 0, MATCHED_TASKS[regime], "fixed"
    I, J = (int(x) for x in arm.split("/"))
    return I, J, tasks, "fixed"


# ---- one run (a child process) -------------------------------------------------------------------
def write_identities(settings, agents: int, seed_index: int) -> None:
    """Deterministic peer identities per seed: the same seed gets the same peer ids, hence the same tasks
    round by round, in every arm (tasks depend on (seed, round, peer)), so arms are compared paired."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2pswarm.identity import Identity
    from p2pswarm.node import identity_path

    for i in range(agents):
        key = hashlib.sha256(f"p2pswarm-bench-sapo:{seed_index}:{i}".encode()).digest()
        ident = Identity(Ed25519PrivateKey.from_private_bytes(key))
        path = identity_path(settings, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ident.to_bytes())


def run_one(cell: dict, seed_index: int, rounds: int, tasks: int, out: Path) -> None:
    import torch

    from p2pswarm.node import build_swarm, run_agents
    from p2pswarm.settings import load_settings

    regime, protocol, agents, arm = cell["regime"], cell["protocol"], cell["agents"], cell["arm"]
    I, J, n_tasks, split = arm_split(arm, regime, tasks)
    extra = {"preset": str(PRESETS[regime])} if regime in PRESETS else {}
    work = Path(tempfile.mkdtemp(prefix="sapo-run-"))
    load0 = os.getloadavg()
    try:
        s = load_settings(
            agents=agents, comm="inprocess", local_groups=I, swarm_groups=J, tasks_per_round=n_tasks,
            selection=protocol, split=split, seed=seed_for(seed_index), rounds=rounds, eval_every=0,
            eval_size=200, runs_dir=work, experiment=f"sapo-{seed_index}", threads=1,
            checkpoint_every=max(rounds, 1), keep_checkpoints=1,
            # lockstep: every agent waits for all others each round, even on a loaded machine
            collect_timeout=600.0, log_level="WARNING", **extra,
        )
        write_identities(s, agents, seed_index)
        torch.manual_seed(seed_for(seed_index))
        t0 = time.perf_counter()
        swarm = build_swarm(s)
        build_s = time.perf_counter() - t0
        eval_tasks = swarm[0].data.with_prompts(swarm[0].data.eval_tasks())
        before = swarm[0].trainer.evaluate(eval_tasks, swarm[0].rewards.reward)  # all agents start identical
        picks: dict[str, list[tuple[int, int, bool]]] = {}
        for a in swarm:
            sel, log_ = a.trainer.selector, picks.setdefault(a.peer_id, [])

            def select(state, _sel=sel, _orig=sel.select, _log=log_):
                out_ = _orig(state)
                _log.append((_sel.last.signal, _sel.last.j, _sel.last.fallback))
                return out_

            sel.select = select
        t1, c1 = time.perf_counter(), time.process_time()
        run_agents(swarm, rounds)
        train_s, train_cpu = time.perf_counter() - t1, time.process_time() - c1
        per_agent = []
        for a in swarm:
            rows = sorted(a.run_dir.read_metrics(), key=lambda m: m["round"])
            if len(rows) != rounds or len(picks[a.peer_id]) != rounds:
                raise RuntimeError(f"{a.name}: {len(rows)} metric rows, expected {rounds}")
            tasks_ = a.data.with_prompts(a.data.eval_tasks())
            per_agent.append({
                "peer": a.peer_id,
                "reward_local": [m["reward_local_mean"] for m in rows],
                "local_groups": [m["local_groups"] for m in rows],
                "swarm_groups": [m["swarm_groups"] for m in rows],
                "signal_groups": [p[0] for p in picks[a.peer_id]],
                "j": [p[1] for p in picks[a.peer_id]],
                "fallback": [int(p[2]) for p in picks[a.peer_id]],
                "skipped": [int(bool(m["skipped_update"])) for m in rows],
                "swarm_groups_received": [m["swarm_groups_received"] for m in rows],
                "signal_fraction": [m["signal_fraction"] for m in rows],
                "eval": a.trainer.evaluate(tasks_, a.rewards.reward),
            })
        result = {
            **cell, "seed_index": seed_index, "seed": seed_for(seed_index), "rounds": rounds,
            "I": I, "J": J, "split": split, "tasks_per_round": n_tasks, "preset": s.preset,
            "G": s.num_generations, "max_new_tokens": s.max_new_tokens, "learning_rate": s.learning_rate,
            "wall_seconds": time.perf_counter() - t0, "build_seconds": build_s, "train_seconds": train_s,
            "train_cpu_seconds": train_cpu, "cpu_seconds": time.process_time(),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "eval_before": before,
            "per_agent": per_agent,
        }
        out.write_text(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the experiment (parent) ---------------------------------------------------------------------
def load_results(path: Path) -> dict:
    if path.exists():
        doc = json.loads(path.read_text())
        # Runs of the earlier bench (one cell: default regime, p2p, 4 agents) have no cell fields.
        doc["runs"] = [r for r in doc.get("runs", []) if "regime" in r]
        return doc
    return {"benchmark": "sapo", "runs": []}


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def save_results(path: Path, doc: dict) -> None:
    """Readable head (config, summary), then one compact line per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in doc.items() if k != "runs"}
    parts = [f" {json.dumps(k)}: {json.dumps(_rounded(v), indent=1)}" for k, v in head.items()]
    runs = ",\n".join("  " + json.dumps(_rounded(r)) for r in doc.get("runs", []))
    parts.append(f' "runs": [\n{runs}\n ]')
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    os.replace(tmp, path)


def cell_of(r: dict) -> tuple:
    return (r["regime"], r["protocol"], r["agents"])


def run_key(r: dict) -> tuple:
    return (*cell_of(r), r["arm"], r["seed_index"], r["rounds"])


def cumulative(run: dict) -> float:
    """Sum over rounds of the agent's own sampled reward, averaged over agents."""
    return statistics.fmean(sum(a["reward_local"]) for a in run["per_agent"])


def per_update(run: dict, key: str) -> float:
    return statistics.fmean(x for a in run["per_agent"] for x in a[key])


def ci95(xs: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of a Student t 95% interval; None under 2 values."""
    if len(xs) < 2:
        return None
    m, sd, df = statistics.fmean(xs), statistics.stdev(xs), len(xs) - 1
    t = T95.get(df) or T95[max(k for k in T95 if k <= df)]
    half = t * sd / math.sqrt(len(xs))
    return m, m - half, m + half


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (regime, protocol, agents, arm); gains are paired with 8/0 of the same cell and seed."""
    rows = []
    cells = sorted({cell_of(r) for r in runs}, key=lambda c: (REGIMES.index(c[0]), PROTOCOLS.index(c[1]), c[2]))
    for cell in cells:
        in_cell = [r for r in runs if cell_of(r) == cell]
        base = {r["seed_index"]: r for r in in_cell if r["arm"] == "8/0"}
        for arm in ARMS:
            rs = sorted((r for r in in_cell if r["arm"] == arm), key=lambda r: r["seed_index"])
            if not rs:
                continue
            n_rounds = rs[0]["rounds"]
            fifth = max(1, n_rounds // 5)
            cums = [cumulative(r) for r in rs]
            paired = [r for r in rs if r["seed_index"] in base]
            rel = [cumulative(r) / cumulative(base[r["seed_index"]]) - 1 for r in paired]
            diff = [(cumulative(r) - cumulative(base[r["seed_index"]])) / n_rounds for r in paired]
            cpu = [r["train_cpu_seconds"] for r in rs]
            agents = rs[0]["agents"]
            row = {
                "regime": cell[0], "protocol": cell[1], "agents": agents, "arm": arm,
                "I": rs[0]["I"], "J": rs[0]["J"], "tasks_per_round": rs[0]["tasks_per_round"],
                "runs": len(rs), "seeds": [r["seed_index"] for r in rs], "rounds": n_rounds,
                "cumulative_mean": statistics.fmean(cums), "cumulative_per_seed": cums,
                "reward_per_round": statistics.fmean(cums) / n_rounds,
                "reward_first_fifth": statistics.fmean(
                    statistics.fmean(statistics.fmean(a["reward_local"][:fifth]) for a in r["per_agent"]) for r in rs),
                "reward_last_fifth": statistics.fmean(
                    statistics.fmean(statistics.fmean(a["reward_local"][-fifth:]) for a in r["per_agent"]) for r in rs),
                "gain_vs_8_0_per_seed": rel,
                "gain_vs_8_0": ci95(rel) if arm != "8/0" else None,
                "reward_diff_per_round_vs_8_0": ci95(diff) if arm != "8/0" else None,
                "signal_groups_per_update": statistics.fmean(per_update(r, "signal_groups") for r in rs),
                "local_groups_per_update": statistics.fmean(per_update(r, "local_groups") for r in rs),
                "swarm_groups_per_update": statistics.fmean(per_update(r, "swarm_groups") for r in rs),
                "skipped_updates": statistics.fmean(per_update(r, "skipped") for r in rs),
                "fallback_rounds": statistics.fmean(per_update(r, "fallback") for r in rs),
                "local_signal_fraction": statistics.fmean(per_update(r, "signal_fraction") for r in rs),
                "train_cpu_seconds": statistics.fmean(cpu),
                "cpu_seconds_per_agent_round": statistics.fmean(cpu) / (agents * n_rounds),
                # reward an agent collects per CPU-second it spends: cumulative / (CPU per agent)
                "reward_per_cpu_second": statistics.fmean(cumulative(r) / (r["train_cpu_seconds"] / agents) for r in rs),
                "heldout_before": rs[0]["eval_before"]["eval_reward"],
                "heldout_after": statistics.fmean(
                    statistics.fmean(a["eval"]["eval_reward"] for a in r["per_agent"]) for r in rs),
                "loadavg_1min": statistics.fmean((r["loadavg_start"][0] + r["loadavg_end"][0]) / 2 for r in rs),
                "paper_gain_vs_8_0": PAPER[arm] / PAPER["8/0"] - 1 if arm in PAPER else None,
            }
            rows.append(row)
    return rows


def _ci(v: list | None, pct: bool = True) -> str:
    if not v:
        return "—"
    m, lo, hi = v
    return f"{m:+.1%} [{lo:+.1%}, {hi:+.1%}]" if pct else f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def table(summary: list[dict]) -> str:
    lines = [
        "| regime | protocol | agents | arm | seeds x rounds | reward / round (first → last fifth) "
        "| gain vs 8/0, 95% CI | reward diff / round, 95% CI | signal groups / update (local + swarm trained) "
        "| skipped updates | reward / CPU-s | CPU-s / agent-round | held-out after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in summary:
        lines.append(
            f"| {v['regime']} | {v['protocol']} | {v['agents']} | {v['arm']} | {v['runs']} x {v['rounds']} "
            f"| {v['reward_per_round']:.3f} ({v['reward_first_fifth']:.3f} → {v['reward_last_fifth']:.3f}) "
            f"| {_ci(v['gain_vs_8_0'])} | {_ci(v['reward_diff_per_round_vs_8_0'], pct=False)} "
            f"| {v['signal_groups_per_update']:.2f} ({v['local_groups_per_update']:.2f} + {v['swarm_groups_per_update']:.2f}) "
            f"| {v['skipped_updates']:.1%} | {v['reward_per_cpu_second']:.3f} | {v['cpu_seconds_per_agent_round']:.3f} "
            f"| {v['heldout_after']:.3f} ({v['heldout_before']:.3f} before) |"
        )
    return "\n".join(lines)


def rolling(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


COLORS = {"8/0": "#444444", "6/2": "#1f77b4", "4/4": "#d62728", "2/6": "#2ca02c", "8/0+": "#9467bd",
          "adaptive": "#ff7f0e"}


def plot(runs: list[dict], summary: list[dict], path: Path, window: int) -> None:
    """One row per cell: reward curves, paired gain vs 8/0 (95% CI), signal groups per update, reward per CPU-s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = list(dict.fromkeys((v["regime"], v["protocol"], v["agents"]) for v in summary))
    fig, axes = plt.subplots(len(cells), 4, figsize=(20, 4.2 * len(cells)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1.2, 1.2, 1.2]})
    for row, cell in zip(axes, cells):
        ax_curve, ax_gain, ax_sig, ax_cpu = row
        vs = [v for v in summary if (v["regime"], v["protocol"], v["agents"]) == cell]
        for v in vs:
            rs = [r for r in runs if cell_of(r) == cell and r["arm"] == v["arm"]]
            curves = np.array([rolling(list(np.mean([a["reward_local"] for a in r["per_agent"]], axis=0)), window)
                               for r in rs])
            ax_curve.plot(curves.mean(axis=0), color=COLORS[v["arm"]], label=f"{v['arm']} (n={len(rs)})")
        ax_curve.set_title(f"{cell[0]} regime, {cell[1]} protocol, {cell[2]} agents")
        ax_curve.set_xlabel("round")
        ax_curve.set_ylabel(f"sampled reward, rolling {window}")
        ax_curve.legend(fontsize=8)
        ax_curve.grid(alpha=0.3)
        arms = [v["arm"] for v in vs]
        x = np.arange(len(vs))
        # With one paired seed there is no interval yet: the bar alone shows that seed's gain.
        gains = [100 * sum(v["gain_vs_8_0_per_seed"]) / max(len(v["gain_vs_8_0_per_seed"]), 1) for v in vs]
        err = np.array([[100 * (v["gain_vs_8_0"][0] - v["gain_vs_8_0"][1]), 100 * (v["gain_vs_8_0"][2] - v["gain_vs_8_0"][0])]
                        if v["gain_vs_8_0"] else [0.0, 0.0] for v in vs]).T
        ax_gain.bar(x, gains, yerr=err, capsize=4, color=[COLORS[a] for a in arms])
        ax_gain.axhline(0, color="black", linewidth=0.8)
        ax_gain.set_xticks(x, arms)
        ax_gain.set_title("cumulative reward vs 8/0 (%), paired, 95% CI (n >= 2)")
        ax_gain.grid(alpha=0.3, axis="y")
        ax_sig.bar(x, [v["signal_groups_per_update"] for v in vs], color=[COLORS[a] for a in arms])
        for xi, v in zip(x, vs):
            ax_sig.text(xi, v["signal_groups_per_update"], f"skip {v['skipped_updates']:.0%}", ha="center",
                        va="bottom", fontsize=8)
        ax_sig.set_xticks(x, arms)
        ax_sig.set_title("groups with signal per update")
        ax_sig.grid(alpha=0.3, axis="y")
        ax_cpu.bar(x, [v["reward_per_cpu_second"] for v in vs], color=[COLORS[a] for a in arms])
        ax_cpu.set_xticks(x, arms)
        ax_cpu.set_title("reward per CPU-second (per agent)")
        ax_cpu.grid(alpha=0.3, axis="y")
    fig.suptitle("SAPO in miniature: embedded-policy agents, G=4; arms paired by seed (same tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(doc: dict, stem: Path, window: int) -> None:
    doc["summary"] = summarise(doc["runs"])
    save_results(stem.with_suffix(".json"), doc)
    with open(stem.with_suffix(".csv"), "w") as f:
        f.write("regime,protocol,agents,arm,seed_index,agent,round,reward_local,local_groups,swarm_groups,"
                "signal_groups,skipped,fallback,signal_fraction\n")
        for r in doc["runs"]:
            for i, a in enumerate(r["per_agent"]):
                for k, x in enumerate(a["reward_local"]):
                    f.write(f"{r['regime']},{r['protocol']},{r['agents']},{r['arm']},{r['seed_index']},{i},{k},"
                            f"{x:.6f},{a['local_groups'][k]},{a['swarm_groups'][k]},{a['signal_groups'][k]},"
                            f"{a['skipped'][k]},{a['fallback'][k]},{a['signal_fraction'][k]:.4f}\n")
    if doc["runs"]:
        plot(doc["runs"], doc["summary"], stem.with_suffix(".png"), window)


def _list(text: str, allowed, kind=str) -> list:
    out = [kind(x.strip()) for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}: one of {list(allowed)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 seeds x 10 rounds (minutes)")
    mode.add_argument("--full", action="store_true", help="the whole grid, 300 rounds (hours)")
    ap.add_argument("--rounds", type=int, help="override the mode's rounds")
    ap.add_argument("--seeds", type=int, help="override the mode's seed count")
    ap.add_argument("--regimes", help=f"comma-separated, of {','.join(REGIMES)}")
    ap.add_argument("--protocols", help=f"comma-separated, of {','.join(PROTOCOLS)}")
    ap.add_argument("--agents", help="comma-separated agent counts (4, 8)")
    ap.add_argument("--arms", help=f"comma-separated, of {','.join(ARMS)}")
    ap.add_argument("--tasks", type=int, default=8, help="tasks per round and agent (>= 8 so I=8 is possible)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (separate processes)")
    ap.add_argument("--results", type=Path, help="results stem (default by mode: bench/results/sapo[_quick|_full])")
    ap.add_argument("--plot-only", action="store_true", help="only remake summary, CSV and plot")
    ap.add_argument("--window", type=int, help="rolling-mean window of the plot")
    ap.add_argument("--child", nargs=3, metavar=("CELL", "SEED_INDEX", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    name = "quick" if args.quick else "full" if args.full else "default"
    rounds, seeds, stem, window, regimes, protocols, agents, arms = MODES[name]
    rounds = args.rounds or rounds
    seeds = args.seeds or seeds
    window = args.window or window
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        run_one(json.loads(args.child[0]), int(args.child[1]), rounds, args.tasks, Path(args.child[2]))
        return
    regimes = _list(args.regimes, REGIMES) if args.regimes else list(regimes)
    protocols = _list(args.protocols, PROTOCOLS) if args.protocols else list(protocols)
    agents = _list(args.agents, (2, 3, 4, 5, 6, 7, 8), int) if args.agents else list(agents)
    arms = _list(args.arms, ARMS) if args.arms else list(arms)
    if args.tasks < BUDGET:
        ap.error(f"--tasks must be >= {BUDGET} so that I=8 is possible")
    stem_path = (args.results or RESULTS_DIR / stem).with_suffix("")
    doc = load_results(stem_path.with_suffix(".json"))
    if args.plot_only:
        write_outputs(doc, stem_path, window)
        print(table(doc["summary"]))
        return
    # Seed-major order: an interrupted run leaves complete pairs behind.
    cells = [{"regime": g, "protocol": p, "agents": n, "arm": a}
             for g in regimes for p in protocols for n in agents for a in arms]
    todo = [(c, k) for k in range(seeds) for c in cells]
    done = {run_key(r) for r in doc["runs"]}
    todo = [(c, k) for c, k in todo if (c["regime"], c["protocol"], c["agents"], c["arm"], k, rounds) not in done]
    doc.setdefault("machine", {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()})
    doc["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    print(f"{len(todo)} run(s) to do ({len(done)} already recorded in {stem_path.with_suffix('.json')}): "
          f"{rounds} rounds, {args.jobs} in parallel", flush=True)
    t_start = time.perf_counter()

    def command(c, k):
        return lambda out: [sys.executable, __file__, "--child", json.dumps(c), str(k), str(out), "--rounds",
                            str(rounds), "--tasks", str(args.tasks)]

    def on_done(key, run, seconds):
        c, k = key
        doc = load_results(stem_path.with_suffix(".json"))  # re-read: append to what is on disk
        doc.setdefault("machine", {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()})
        doc["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
        doc["runs"] = [r for r in doc["runs"] if run_key(r) != run_key(run)] + [run]
        write_outputs(doc, stem_path, window)
        print(f"  done  {c} seed {k}: cumulative {cumulative(run):.2f}, signal groups/update "
              f"{per_update(run, 'signal_groups'):.2f}, train CPU {run['train_cpu_seconds']:.0f} s, {seconds:.0f} s "
              f"({time.perf_counter() - t_start:.0f} s total, load {os.getloadavg()[0]:.1f})", flush=True)

    failed = run_children([((c, k), f"{c} seed {k}", command(c, k)) for c, k in todo], args.jobs, on_done, "sapo-")
    doc = load_results(stem_path.with_suffix(".json"))
    if doc["runs"]:
        write_outputs(doc, stem_path, window)
        print(table(doc["summary"]))
    if failed:
        sys.exit(f"{failed} run(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()

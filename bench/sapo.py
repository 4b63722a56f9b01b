"""The SAPO experiment in miniature: does sharing rollouts help?

4 agents of the embedded policy in one process (the in-process swarm, `build_swarm` + `run_agents`: the
project's own round loop, exchange and trainer), the same nominal update size I + J = 8 for every split, I/J =
8/0 (no sharing), 6/2, 4/4, 2/6 (local/swarm groups per update, the paper's "local/external rollouts"),
several seeds each. Measured per round and agent: the mean sampled reward of the agent's own rollouts
(`reward_local_mean`, 8 tasks x G completions). Cumulative reward = sum over rounds, averaged over agents.
After the last round every agent is scored greedily on the held-out split (200 tasks).

    python bench/sapo.py --quick        # 2 seeds x 4 splits x 20 rounds: a few minutes, bench/results/sapo_quick.*
    python bench/sapo.py                # 3 seeds x 4 splits x 150 rounds: ~25 min on 2 idle cores, bench/results/sapo.*
    python bench/sapo.py --full         # 3 seeds x 4 splits x 2000 rounds (the paper's length): ~5-6 h on 2 idle cores, sapo_full.*
    python bench/sapo.py --plot-only    # remake the summary and the plot from the results file

Every (split, seed) run is its own process (a crash loses one run), and is appended to the results JSON as
soon as it finishes; a rerun skips the runs already recorded (same rounds and settings), so an interrupted
experiment resumes where it stopped. Run it under `nice -n 19` on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
SPLITS = ("8/0", "6/2", "4/4", "2/6")
# arXiv 2509.08721, 8 Qwen2.5-0.5B agents, 2000 rounds: cumulative reward per configuration.
PAPER = {"8/0": 561.79, "6/2": 854.43, "4/4": 1093.31, "2/6": 945.87}
MODES = {
    # name: (rounds, seeds, results stem, rolling window for the plot)
    "quick": (20, 2, "sapo_quick", 5),
    "default": (150, 3, "sapo", 15),
    "full": (2000, 3, "sapo_full", 100),
}


def seed_for(seed_index: int) -> int:
    """Settings seed of run `seed_index`; agent i uses seed + i, so runs must be further apart than the agents."""
    return 1000 * (seed_index + 1)


# ---- one run (a child process) -------------------------------------------------------------------
def write_identities(settings, agents: int, seed_index: int) -> None:
    """Deterministic peer identities per seed: the same seed gets the same peer ids, hence the same tasks
    round by round, in every split (tasks depend on (seed, round, peer)), so splits are compared paired."""
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


def run_one(split: str, seed_index: int, rounds: int, agents: int, tasks: int, out: Path) -> None:
    import torch

    from p2pswarm.node import build_swarm, run_agents
    from p2pswarm.settings import load_settings

    I, J = (int(x) for x in split.split("/"))
    work = Path(tempfile.mkdtemp(prefix="sapo-run-"))
    try:
        s = load_settings(
            agents=agents, comm="inprocess", local_groups=I, swarm_groups=J, tasks_per_round=tasks,
            seed=seed_for(seed_index), rounds=rounds, eval_every=0, eval_size=200, runs_dir=work,
            experiment=f"sapo-{I}-{J}-{seed_index}", checkpoint_every=max(rounds, 1), keep_checkpoints=1,
            # lockstep: every agent waits for all others each round, even on a loaded machine
            collect_timeout=600.0, log_level="WARNING",
        )
        write_identities(s, agents, seed_index)
        torch.manual_seed(seed_for(seed_index))
        t0, c0 = time.perf_counter(), time.process_time()
        swarm = build_swarm(s)
        build_s = time.perf_counter() - t0
        eval_tasks = swarm[0].data.with_prompts(swarm[0].data.eval_tasks())
        before = swarm[0].trainer.evaluate(eval_tasks, swarm[0].rewards.reward)  # all agents start identical
        t1 = time.perf_counter()
        run_agents(swarm, rounds)
        train_s = time.perf_counter() - t1
        per_agent = []
        for a in swarm:
            rows = sorted(a.run_dir.read_metrics(), key=lambda m: m["round"])
            if len(rows) != rounds:
                raise RuntimeError(f"{a.name}: {len(rows)} metric rows, expected {rounds}")
            tasks_ = a.data.with_prompts(a.data.eval_tasks())
            per_agent.append({
                "peer": a.peer_id,
                "node": a.name,
                "reward_local": [m["reward_local_mean"] for m in rows],
                "reward_swarm": [m["reward_swarm_mean"] for m in rows],
                "local_groups": [m["local_groups"] for m in rows],
                "swarm_groups": [m["swarm_groups"] for m in rows],
                "swarm_groups_received": [m["swarm_groups_received"] for m in rows],
                "signal_fraction": [m["signal_fraction"] for m in rows],
                "eval": a.trainer.evaluate(tasks_, a.rewards.reward),
            })
        result = {
            "split": split, "I": I, "J": J, "seed_index": seed_index, "seed": seed_for(seed_index),
            "rounds": rounds, "agents": agents, "tasks_per_round": tasks,
            "G": s.num_generations, "max_new_tokens": s.max_new_tokens, "learning_rate": s.learning_rate,
            "wall_seconds": time.perf_counter() - t0, "build_seconds": build_s, "train_seconds": train_s,
            "cpu_seconds": time.process_time() - c0,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "eval_before": before,
            "per_agent": per_agent,
        }
        out.write_text(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the experiment (parent) ---------------------------------------------------------------------
def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
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


def run_key(r: dict) -> tuple:
    return (r["split"], r["seed_index"], r["rounds"], r["agents"], r["tasks_per_round"])


def cumulative(run: dict) -> float:
    """Sum over rounds of the agent's own sampled reward, averaged over agents."""
    return statistics.fmean(sum(a["reward_local"]) for a in run["per_agent"])


def summarise(runs: list[dict]) -> dict:
    by = {sp: [r for r in runs if r["split"] == sp] for sp in SPLITS}
    base = by.get("8/0") or []
    base_by_seed = {r["seed_index"]: cumulative(r) for r in base}
    out = {}
    for sp, rs in by.items():
        if not rs:
            continue
        cums = [cumulative(r) for r in rs]
        evals = [statistics.fmean(a["eval"]["eval_reward"] for a in r["per_agent"]) for r in rs]
        paired = [cumulative(r) / base_by_seed[r["seed_index"]] - 1 for r in rs if r["seed_index"] in base_by_seed]
        n_rounds = rs[0]["rounds"]
        last = max(1, n_rounds // 5)
        third = max(1, n_rounds // 3)
        base_runs = {r["seed_index"]: r for r in base}
        late_diff = [
            statistics.fmean(statistics.fmean(a["reward_local"][-third:]) for a in r["per_agent"])
            - statistics.fmean(statistics.fmean(a["reward_local"][-third:]) for a in base_runs[r["seed_index"]]["per_agent"])
            for r in rs if r["seed_index"] in base_runs
        ]
        late = [statistics.fmean(statistics.fmean(a["reward_local"][-last:]) for a in r["per_agent"]) for r in rs]
        early = [statistics.fmean(statistics.fmean(a["reward_local"][:last]) for a in r["per_agent"]) for r in rs]
        lg = [statistics.fmean(x for a in r["per_agent"] for x in a["local_groups"]) for r in rs]
        sg = [statistics.fmean(x for a in r["per_agent"] for x in a["swarm_groups"]) for r in rs]
        sig = [statistics.fmean(x for a in r["per_agent"] for x in a["signal_fraction"]) for r in rs]
        out[sp] = {
            "runs": len(rs),
            "seeds": sorted(r["seed_index"] for r in rs),
            "rounds": n_rounds,
            "cumulative_mean": statistics.fmean(cums),
            "cumulative_std": statistics.stdev(cums) if len(cums) > 1 else 0.0,
            "cumulative_per_seed": cums,
            "mean_reward_per_round": statistics.fmean(cums) / n_rounds,
            "relative_to_8_0": (statistics.fmean(cums) / statistics.fmean(base_by_seed.values()) - 1) if base_by_seed else None,
            "paired_relative_mean": statistics.fmean(paired) if paired else None,
            "paired_relative_std": statistics.stdev(paired) if len(paired) > 1 else None,
            "paired_reward_diff_last_third_mean": statistics.fmean(late_diff) if late_diff else None,
            "paired_reward_diff_last_third_std": statistics.stdev(late_diff) if len(late_diff) > 1 else None,
            "reward_first_fifth": statistics.fmean(early),
            "reward_last_fifth": statistics.fmean(late),
            "heldout_mean": statistics.fmean(evals),
            "heldout_std": statistics.stdev(evals) if len(evals) > 1 else 0.0,
            "heldout_before": rs[0]["eval_before"]["eval_reward"],
            "groups_trained_local": statistics.fmean(lg),
            "groups_trained_swarm": statistics.fmean(sg),
            "local_signal_fraction": statistics.fmean(sig),
            "paper_cumulative": PAPER[sp],
            "paper_relative_to_8_0": PAPER[sp] / PAPER["8/0"] - 1,
            "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in rs),
        }
    return out


def table(summary: dict) -> str:
    lines = [
        "| split I/J | runs | cumulative reward (mean ± std) | vs 8/0 | paired vs 8/0 (mean ± std) | paper | paper vs 8/0 "
        "| reward first → last fifth | held-out greedy acc. | groups trained local + swarm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sp, v in summary.items():
        rel = "—" if sp == "8/0" or v["relative_to_8_0"] is None else f"{v['relative_to_8_0']:+.1%}"
        if sp == "8/0" or v["paired_relative_mean"] is None:
            paired = "—"
        else:
            paired = f"{v['paired_relative_mean']:+.1%} ± {(v['paired_relative_std'] or 0):.1%}"
        prel = "—" if sp == "8/0" else f"{v['paper_relative_to_8_0']:+.0%}"
        lines.append(
            f"| {sp} | {v['runs']} | {v['cumulative_mean']:.2f} ± {v['cumulative_std']:.2f} | {rel} | {paired} "
            f"| {v['paper_cumulative']:.2f} | {prel} | {v['reward_first_fifth']:.3f} → {v['reward_last_fifth']:.3f} "
            f"| {v['heldout_mean']:.3f} ± {v['heldout_std']:.3f} | {v['groups_trained_local']:.2f} + {v['groups_trained_swarm']:.2f} |"
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


def plot(runs: list[dict], summary: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"8/0": "#444444", "6/2": "#1f77b4", "4/4": "#d62728", "2/6": "#2ca02c"}
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [2, 2, 1.1]})
    agent_mean = {(r["split"], r["seed_index"]): np.mean([a["reward_local"] for a in r["per_agent"]], axis=0) for r in runs}
    for sp in SPLITS:
        rs = [r for r in runs if r["split"] == sp]
        if not rs:
            continue
        curves = np.array([rolling(list(agent_mean[sp, r["seed_index"]]), window) for r in rs])
        x = np.arange(curves.shape[1])
        m = curves.mean(axis=0)
        ax1.plot(x, m, color=colors[sp], label=f"{sp} (n={len(rs)})")
        if len(rs) > 1:
            sd = curves.std(axis=0, ddof=1)
            ax1.fill_between(x, m - sd, m + sd, color=colors[sp], alpha=0.15, linewidth=0)
        # paired by seed: same peers, hence the same tasks round by round, in every split
        diffs = [rolling(list(agent_mean[sp, r["seed_index"]] - agent_mean["8/0", r["seed_index"]]), window)
                 for r in rs if ("8/0", r["seed_index"]) in agent_mean]
        if sp != "8/0" and diffs:
            d = np.array(diffs)
            dm = d.mean(axis=0)
            ax3.plot(x, dm, color=colors[sp], label=f"{sp} - 8/0 (n={len(d)})")
            if len(d) > 1:
                dsd = d.std(axis=0, ddof=1)
                ax3.fill_between(x, dm - dsd, dm + dsd, color=colors[sp], alpha=0.15, linewidth=0)
    ax1.set_xlabel("round")
    ax1.set_ylabel(f"sampled reward of own rollouts\n(mean of 4 agents, rolling mean over {window} rounds)")
    ax1.set_title("reward per round, band: ± 1 std across seeds")
    ax1.legend(title="local/swarm groups", loc="lower right")
    ax1.grid(alpha=0.3)
    ax3.axhline(0, color="#444444", linewidth=1)
    ax3.set_xlabel("round")
    ax3.set_ylabel(f"reward difference to 8/0, same seed\n(rolling mean over {window} rounds)")
    ax3.set_title("paired difference to no sharing, band: ± 1 std")
    ax3.legend(loc="lower right")
    ax3.grid(alpha=0.3)
    sps = [sp for sp in SPLITS if sp in summary and sp != "8/0"]
    if sps and "8/0" in summary:
        xi = np.arange(len(sps))
        ours = [100 * summary[sp]["paired_relative_mean"] for sp in sps]
        err = [100 * (summary[sp]["paired_relative_std"] or 0) for sp in sps]
        paper = [100 * summary[sp]["paper_relative_to_8_0"] for sp in sps]
        ax2.bar(xi - 0.2, ours, 0.4, yerr=err, capsize=4, color=[colors[sp] for sp in sps], label="this run (paired per seed, ± std)")
        ax2.bar(xi + 0.2, paper, 0.4, color="none", edgecolor="black", hatch="//", label="paper (8 x Qwen2.5-0.5B, 2000 rounds)")
        ax2.axhline(0, color="black", linewidth=0.8)
        ax2.set_xticks(xi, sps)
        ax2.set_ylabel("cumulative reward vs 8/0 (%)")
        ax2.set_title("gain over no sharing")
        ax2.set_ylim(top=max(paper + [0]) * 1.35)
        ax2.legend(fontsize=8, loc="upper left")
        ax2.grid(alpha=0.3, axis="y")
    rounds = runs[0]["rounds"] if runs else 0
    fig.suptitle(f"SAPO in miniature: 4 embedded-policy agents, {rounds} rounds, 8 tasks x G=4 per agent per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict, stem: Path, window: int) -> None:
    doc["summary"] = summarise(doc["runs"])
    save_results(stem.with_suffix(".json"), doc)
    with open(stem.with_suffix(".csv"), "w") as f:
        f.write("split,seed_index,agent,round,reward_local,local_groups,swarm_groups,signal_fraction\n")
        for r in doc["runs"]:
            for i, a in enumerate(r["per_agent"]):
                for k, x in enumerate(a["reward_local"]):
                    f.write(f"{r['split']},{r['seed_index']},{i},{k},{x:.6f},{a['local_groups'][k]},"
                            f"{a['swarm_groups'][k]},{a['signal_fraction'][k]:.4f}\n")
    if doc["runs"]:
        plot(doc["runs"], doc["summary"], stem.with_suffix(".png"), window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 seeds x 20 rounds (minutes)")
    mode.add_argument("--full", action="store_true", help="3 seeds x 2000 rounds, the paper's length (hours)")
    ap.add_argument("--rounds", type=int, help="override the mode's rounds")
    ap.add_argument("--seeds", type=int, help="override the mode's seed count")
    ap.add_argument("--splits", default=",".join(SPLITS), help="comma-separated I/J splits")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8, help="tasks per round and agent (>= 8 so I=8 is possible)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (separate processes)")
    ap.add_argument("--results", type=Path, help="results stem (default by mode: bench/results/sapo[_quick|_full])")
    ap.add_argument("--plot-only", action="store_true", help="only remake summary, CSV and plot")
    ap.add_argument("--window", type=int, help="rolling-mean window of the plot")
    # child mode
    ap.add_argument("--child", nargs=3, metavar=("SPLIT", "SEED_INDEX", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    name = "quick" if args.quick else "full" if args.full else "default"
    rounds, seeds, stem, window = MODES[name]
    rounds = args.rounds or rounds
    seeds = args.seeds or seeds
    window = args.window or window
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        run_one(args.child[0], int(args.child[1]), rounds, args.agents, args.tasks, Path(args.child[2]))
        return
    stem_path = (args.results or RESULTS_DIR / stem).with_suffix("")
    doc = load_results(stem_path.with_suffix(".json"))
    if args.plot_only:
        write_outputs(doc, stem_path, window)
        print(table(doc["summary"]))
        return
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    for sp in splits:
        I, J = (int(x) for x in sp.split("/"))
        if I > args.tasks:
            ap.error(f"split {sp}: I={I} local groups need --tasks >= {I}")
    other = {(r["rounds"], r["agents"], r["tasks_per_round"]) for r in doc["runs"]} - {(rounds, args.agents, args.tasks)}
    if other:
        ap.error(f"{stem_path.with_suffix('.json')} holds runs of another configuration (rounds, agents, tasks) "
                 f"{sorted(other)}; pass --results for a new file")
    todo = [(sp, k) for k in range(seeds) for sp in splits]
    done = {run_key(r) for r in doc["runs"]}
    todo = [(sp, k) for sp, k in todo if (sp, k, rounds, args.agents, args.tasks) not in done]
    doc.setdefault("machine", {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()})
    doc["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    print(f"{len(todo)} run(s) to do ({len(done)} already recorded in {stem_path.with_suffix('.json')}): "
          f"{args.agents} agents, {rounds} rounds, {args.jobs} in parallel", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="sapo-"))
    t_start = time.perf_counter()
    running: list[tuple[subprocess.Popen, str, int, Path, float]] = []
    failed = 0
    try:
        while todo or running:
            while todo and len(running) < max(1, args.jobs):
                sp, k = todo.pop(0)
                out = tmp / f"{sp.replace('/', '-')}_{k}.json"
                cmd = [sys.executable, __file__, "--child", sp, str(k), str(out), "--rounds", str(rounds),
                       "--agents", str(args.agents), "--tasks", str(args.tasks)]
                running.append((subprocess.Popen(cmd), sp, k, out, time.perf_counter()))
                print(f"  start {sp} seed {k}", flush=True)
            time.sleep(1.0)
            for item in list(running):
                proc, sp, k, out, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0 or not out.exists():
                    failed += 1
                    print(f"  FAILED {sp} seed {k} (exit {proc.returncode})", flush=True)
                    continue
                doc = load_results(stem_path.with_suffix(".json"))  # re-read: append to what is on disk
                doc.setdefault("machine", {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()})
                doc["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
                run = json.loads(out.read_text())
                doc["runs"] = [r for r in doc["runs"] if run_key(r) != run_key(run)] + [run]
                write_outputs(doc, stem_path, window)
                print(f"  done  {sp} seed {k}: cumulative {cumulative(run):.2f}, held-out "
                      f"{statistics.fmean(a['eval']['eval_reward'] for a in run['per_agent']):.3f}, "
                      f"{time.perf_counter() - t0:.0f} s ({len(todo)} queued, {len(running)} running, "
                      f"{time.perf_counter() - t_start:.0f} s total)", flush=True)
    finally:
        for proc, *_ in running:
            proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    doc = load_results(stem_path.with_suffix(".json"))
    if doc["runs"]:
        write_outputs(doc, stem_path, window)
        print(table(doc["summary"]))
    if failed:
        sys.exit(f"{failed} run(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()

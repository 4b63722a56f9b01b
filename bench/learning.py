"""Does one node learn? N seeds of a lone node with the default settings, curves and first/last-10% figures.

Each seed is one node exactly as `p2pswarm run --headless --rounds R --seed S` builds it (the embedded policy,
the `easy` preset, every trainer default), on the in-process backend so that no DHT is started (a lone node
trains the same either way: it has no swarm groups). Recorded per round: the mean sampled reward of the
node's own rollouts (`reward_local_mean`), and every `--eval-every` rounds the greedy accuracy on the 200
held-out tasks (`trainer.evaluate`, the TUI's held-out curve), plus one eval before the first round.

    python bench/learning.py                    # 3 seeds x 2000 rounds: about 25 CPU-min per seed on an idle core
    python bench/learning.py --rounds 300       # a shorter look (the results file is named after the rounds)
    python bench/learning.py --plot-only        # remake summary and plot from the results file

Figures per seed: sampled reward and held-out accuracy over the first vs the last 10% of rounds (the held-out
"first" includes the eval before round 0), the rise, and "collapse" (the held-out accuracy ever falling more
than 0.10 below where it started). Every seed is its own process and is appended to
bench/results/learning[_<rounds>].json as soon as it finishes; a rerun skips the seeds already recorded.
Run it under `nice` on a shared machine; timings are recorded with the load average, they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _children import run_children  # noqa: E402 - the child-process runner the benches share
from sapo import rolling  # noqa: E402 - one copy of the trailing mean the bench plots share

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROUNDS = 2000
COLLAPSE_DROP = 0.10  # held-out accuracy this far below its start at any eval: the run collapsed


def stem_for(rounds: int) -> Path:
    return RESULTS_DIR / ("learning" if rounds == DEFAULT_ROUNDS else f"learning_{rounds}")


# ---- one seed (a child process) ------------------------------------------------------------------
def run_one(seed: int, rounds: int, eval_every: int, out: Path) -> None:
    import torch

    from p2pswarm.node import build_swarm, run_agents
    from p2pswarm.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="learning-run-"))
    try:
        # Only what a bench needs differs from `p2pswarm run`: the backend (no DHT for a lone node), the
        # eval cadence and size (the whole held-out split), a scratch folder, and one thread per seed.
        s = load_settings(comm="inprocess", seed=seed, rounds=rounds, eval_every=eval_every, eval_size=200,
                          runs_dir=work, checkpoint_every=rounds, keep_checkpoints=1, log_level="WARNING", threads=1)
        torch.manual_seed(seed)
        t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
        node = build_swarm(s)[0]
        tasks = node.data.with_prompts(node.data.eval_tasks())
        before = node.trainer.evaluate(tasks, node.rewards.reward)
        print(f"  seed {seed}: held-out {before['eval_reward']:.3f} before round 0; metrics in {node.run_dir.path}",
              flush=True)
        run_agents([node], rounds)
        rows = sorted(node.run_dir.read_metrics(), key=lambda m: m["round"])
        if len(rows) != rounds:
            raise RuntimeError(f"{len(rows)} metric rows, expected {rounds}")
        result = {
            "seed": seed, "rounds": rounds, "eval_every": eval_every,
            "settings": {k: getattr(s, k) for k in (
                "preset", "tasks_per_round", "num_generations", "local_groups", "swarm_groups", "max_new_tokens",
                "temperature", "learning_rate", "adam_beta2", "weight_decay", "num_iterations", "beta",
                "epsilon", "epsilon_high", "loss_type", "max_grad_norm")},
            "reward": [m["reward_local_mean"] for m in rows],
            "signal_fraction": [m["signal_fraction"] for m in rows],
            "skipped_updates": sum(bool(m["skipped_update"]) for m in rows),
            "heldout": [[-1, before["eval_reward"]]] + [[m["round"], m["eval_reward"]] for m in rows if "eval_reward" in m],
            "heldout_before": before,
            "heldout_after": {k: v for k, v in rows[-1].items() if k.startswith("eval_")} if "eval_reward" in rows[-1] else None,
            "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        }
        out.write_text(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- summary, plot -------------------------------------------------------------------------------
def figures(run: dict) -> dict:
    n, tenth = run["rounds"], max(1, run["rounds"] // 10)
    r = run["reward"]
    first_h = [acc for rnd, acc in run["heldout"] if rnd < tenth]
    last_h = [acc for rnd, acc in run["heldout"] if rnd >= n - tenth]
    start = run["heldout"][0][1]
    f = {
        "reward_first10": statistics.fmean(r[:tenth]),
        "reward_last10": statistics.fmean(r[-tenth:]),
        "heldout_first10": statistics.fmean(first_h),
        "heldout_last10": statistics.fmean(last_h) if last_h else None,
        "heldout_min": min(acc for _, acc in run["heldout"]),
    }
    f["reward_rise"] = f["reward_last10"] - f["reward_first10"]
    f["heldout_rise"] = f["heldout_last10"] - f["heldout_first10"] if last_h else None
    f["collapsed"] = f["heldout_min"] < start - COLLAPSE_DROP
    return f


def summarise(runs: list[dict]) -> dict:
    per = {str(r["seed"]): figures(r) for r in runs}
    out: dict = {"seeds": len(runs), "per_seed": per}
    for k in ("reward_first10", "reward_last10", "reward_rise", "heldout_first10", "heldout_last10", "heldout_rise"):
        xs = [v[k] for v in per.values() if v[k] is not None]
        out[k] = statistics.fmean(xs) if xs else None
    out["min_reward_rise"] = min(v["reward_rise"] for v in per.values())
    out["min_heldout_rise"] = min((v["heldout_rise"] for v in per.values() if v["heldout_rise"] is not None), default=None)
    out["collapsed_seeds"] = sum(v["collapsed"] for v in per.values())
    cpu = [r["cpu_seconds"] / r["rounds"] for r in runs if r.get("cpu_seconds")]
    out["cpu_seconds_per_round"] = statistics.fmean(cpu) if cpu else None
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = runs[0]["rounds"]
    window = max(10, rounds // 40)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, r in enumerate(sorted(runs, key=lambda r: r["seed"])):
        c = f"C{i}"
        ax1.plot(rolling(r["reward"], window), color=c, label=f"seed {r['seed']}")
        x, y = zip(*[(max(rnd, 0), acc) for rnd, acc in r["heldout"]])
        ax2.plot(x, y, color=c, marker=".", label=f"seed {r['seed']}")
    ax1.set_title(f"sampled reward of the node's own rollouts (rolling mean, {window} rounds)")
    ax2.set_title("held-out greedy accuracy (200 tasks)")
    for ax in (ax1, ax2):
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    s = runs[0]["settings"]
    fig.suptitle(f"one node, defaults ({s['preset']}, G={s['num_generations']}, lr {s['learning_rate']:g}, "
                 f"{s['tasks_per_round']} tasks/round), {rounds} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(doc: dict, stem: Path) -> None:
    doc["summary"] = summarise(doc["runs"])
    stem.parent.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in doc.items() if k != "runs"}
    runs = ",\n".join("  " + json.dumps(r) for r in doc["runs"])
    text = json.dumps(head, indent=1)[:-2] + f',\n "runs": [\n{runs}\n ]\n}}\n'
    tmp = stem.with_name(f".{stem.name}.json.tmp")
    tmp.write_text(text)
    os.replace(tmp, stem.with_suffix(".json"))
    plot(doc["runs"], stem.with_suffix(".png"))


def report(summary: dict) -> str:
    lines = ["seed  reward first→last 10%      held-out first→last 10%     collapsed"]
    for seed, v in summary["per_seed"].items():
        h = "—" if v["heldout_last10"] is None else f"{v['heldout_first10']:.3f} → {v['heldout_last10']:.3f} ({v['heldout_rise']:+.3f})"
        lines.append(f"{seed:>4}  {v['reward_first10']:.3f} → {v['reward_last10']:.3f} ({v['reward_rise']:+.3f})   {h}   {v['collapsed']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated settings seeds")
    ap.add_argument("--eval-every", type=int, help="rounds between held-out evals (default: rounds / 20)")
    ap.add_argument("--jobs", type=int, default=3, help="seeds in parallel (separate processes)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SEED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    eval_every = args.eval_every or max(1, args.rounds // 20)
    if args.child:
        run_one(int(args.child[0]), args.rounds, eval_every, Path(args.child[1]))
        return
    stem = stem_for(args.rounds)
    path = stem.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "learning", "runs": []}
    if args.plot_only:
        if not doc["runs"]:
            sys.exit(f"no {args.rounds}-round results in {path}: run `python bench/learning.py --rounds {args.rounds}` "
                     "first (or pass the --rounds of a recorded run)")
        save(doc, stem)
        print(report(doc["summary"]))
        return
    done = {r["seed"] for r in doc["runs"]}
    todo = [int(x) for x in args.seeds.split(",") if x.strip() and int(x) not in done]
    doc["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    doc["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    print(f"{len(todo)} seed(s) to run ({len(done)} recorded in {path}), {args.rounds} rounds", flush=True)
    def command(seed):
        return lambda out: [sys.executable, __file__, "--child", str(seed), str(out), "--rounds", str(args.rounds),
                            "--eval-every", str(eval_every)]

    def on_done(seed, run, seconds):
        nonlocal doc
        doc = json.loads(path.read_text()) if path.exists() else doc
        doc["runs"] = [r for r in doc["runs"] if r["seed"] != seed] + [run]
        save(doc, stem)
        print(f"  done  seed {seed}\n{report(doc['summary'])}", flush=True)

    failed = run_children([(seed, f"seed {seed}", command(seed)) for seed in todo], args.jobs, on_done, "learning-",
                          poll_s=2.0)
    if failed:
        sys.exit(f"{failed} seed(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()

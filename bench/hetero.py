"""Heterogeneous swarms (beyond the SAPO paper, its §7 open question): does sharing transfer a skill one agent lacks?

Two specialists of the embedded architecture, each warm-started (scripts/build_default_policy.py --datasets)
on its own datasets of the `easy` preset only, and blind to the others:

    arith   basic_arithmetic, chain_sum
    words   leg_counting, letter_counting, spell_backward

Agents alternate between them (agent 0 arith, 1 words, 2 arith, ...) in one in-process swarm (`build_agent`
on one InProcessHub: the project's own round loop, exchange and trainer, as bench/sapo.py runs agents), and
every agent plays tasks of all five datasets. Two arms on the same tasks (the same peer ids per seed, so
round r brings the same tasks in both):

    alone   I/J = 8/0: each agent learns from its own rollouts only
    shared  I/J = 4/4: four of its groups per update come from the swarm

Measured: each agent's held-out greedy accuracy per dataset (200 tasks) before and after, per round the
sampled reward and swarm groups trained. The transfer figure is an agent's held-out gain on the datasets it
was NOT warm-started on, shared minus alone: a specialist's own rollouts of a dataset it cannot do score 0
(letter_counting aside: its "always 1" answer is right 45% of the time), so without sharing those groups
carry no signal and the skill cannot be learned; with sharing it sees the other specialist's rollouts.

    python bench/hetero.py --quick       # 10 rounds, 1 seed: a smoke run, bench/results/hetero_quick.json
    python bench/hetero.py               # 2 agents x 150 rounds x 2 seeds, both arms: ~10 min of 2 idle cores
    python bench/hetero.py --full        # 4 agents x 500 rounds x 3 seeds (hours)

The specialists are built once into runs/hetero/policies/<name>/ (about 2 min each on 2 idle cores; rebuilt
when the build options change) and reused. Every (arm, seed) run is a child process, recorded in the results
JSON as soon as it ends; a rerun skips what is recorded. Run it under `nice` on a shared machine: the JSON
records the load average, since wall times are noisy when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # this checkout's p2pswarm, whatever else is installed; sapo.py beside it
from _children import run_children  # noqa: E402 - the child-process runner the benches share
from sapo import save_results, seed_for, write_identities  # noqa: E402 - one copy of the paired-seed set-up

RESULTS_DIR = BENCH / "results"
POLICY_DIR = REPO / "runs" / "hetero" / "policies"
SPECIALISTS = {
    "arith": ("basic_arithmetic", "chain_sum"),
    "words": ("leg_counting", "letter_counting", "spell_backward"),
}
ARMS = {"alone": (8, 0), "shared": (4, 4)}
MODES = {  # name: (rounds, seeds, agents, results stem)
    "quick": (10, 1, 2, "hetero_quick"),
    "default": (150, 2, 2, "hetero"),
    "full": (500, 3, 4, "hetero_full"),
}


# ---- the specialists ------------------------------------------------------------------------------
def build_policies(steps: int, seed: int = 0) -> dict[str, Path]:
    """Each specialist's folder, built with scripts/build_default_policy.py unless an identical build exists."""
    out = {}
    for name, datasets in SPECIALISTS.items():
        folder = POLICY_DIR / name
        info = folder / "build_info.json"
        want = {"datasets": list(datasets), "steps": steps, "seed": seed}
        if info.exists() and {k: json.loads(info.read_text()).get(k) for k in want} == want:
            out[name] = folder
            continue
        print(f"building the {name} specialist ({', '.join(datasets)}; {steps} steps) into {folder}", flush=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{name}.log", "w") as log:
            subprocess.run([sys.executable, str(REPO / "scripts" / "build_default_policy.py"), "--datasets",
                            ",".join(datasets), "--steps", str(steps), "--seed", str(seed), "--out", str(folder)],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        out[name] = folder
    return out


def specialist_of(index: int) -> str:
    names = list(SPECIALISTS)
    return names[index % len(names)]


# ---- one run (a child process) -------------------------------------------------------------------
def run_one(arm: str, seed_index: int, rounds: int, agents: int, tasks: int, lr: float, policies: dict[str, str],
            out: Path) -> None:
    import torch

    from p2pswarm.comm.inprocess import InProcessHub
    from p2pswarm.node import build_agent, run_agents
    from p2pswarm.settings import load_settings

    I, J = ARMS[arm]
    work = Path(tempfile.mkdtemp(prefix="hetero-run-"))
    try:
        s = load_settings(
            agents=agents, comm="inprocess", local_groups=I, swarm_groups=J, tasks_per_round=tasks,
            seed=seed_for(seed_index), rounds=rounds, eval_every=0, eval_size=200, runs_dir=work,
            experiment=f"hetero-{arm}-{seed_index}", checkpoint_every=max(rounds, 1), keep_checkpoints=1,
            learning_rate=lr, collect_timeout=600.0, log_level="WARNING",  # lockstep, even on a loaded machine
        )
        write_identities(s, agents, seed_index)
        torch.manual_seed(seed_for(seed_index))
        t0, c0 = time.perf_counter(), time.process_time()
        hub = InProcessHub()
        swarm = [build_agent(s.model_copy(update={"model": policies[specialist_of(i)]}), index=i, hub=hub)
                 for i in range(agents)]
        before = []
        for a in swarm:
            before.append(a.trainer.evaluate(a.data.with_prompts(a.data.eval_tasks()), a.rewards.reward))
        t1 = time.perf_counter()
        run_agents(swarm, rounds)
        train_s = time.perf_counter() - t1
        per_agent = []
        for a, b in zip(swarm, before):
            rows = sorted(a.run_dir.read_metrics(), key=lambda m: m["round"])
            if len(rows) != rounds:
                raise RuntimeError(f"{a.name}: {len(rows)} metric rows, expected {rounds}")
            per_agent.append({
                "node": a.name, "specialist": specialist_of(len(per_agent)),
                "eval_before": b,
                "eval_after": a.trainer.evaluate(a.data.with_prompts(a.data.eval_tasks()), a.rewards.reward),
                "reward_local": [m["reward_local_mean"] for m in rows],
                "swarm_groups": [m["swarm_groups"] for m in rows],
                "local_groups": [m["local_groups"] for m in rows],
                "skipped_update": [bool(m["skipped_update"]) for m in rows],
            })
        out.write_text(json.dumps({
            "arm": arm, "I": I, "J": J, "seed_index": seed_index, "seed": seed_for(seed_index), "rounds": rounds,
            "agents": agents, "tasks_per_round": tasks, "G": s.num_generations, "learning_rate": s.learning_rate,
            "num_iterations": s.num_iterations, "adam_beta2": s.adam_beta2,
            "wall_seconds": time.perf_counter() - t0, "train_seconds": train_s,
            "cpu_seconds": time.process_time() - c0, "loadavg_end": os.getloadavg(), "per_agent": per_agent,
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the experiment (parent) ---------------------------------------------------------------------
def run_key(r: dict) -> tuple:
    return (r["arm"], r["seed_index"], r["rounds"], r["agents"], r["tasks_per_round"], r["learning_rate"])


def summarise(runs: list[dict]) -> dict:
    """Per specialist and arm: held-out accuracy per dataset before and after (mean over agents and seeds), the
    gain on its own and on its missing datasets; and the transfer: missing-dataset gain, shared minus alone,
    paired by seed."""
    out: dict = {}
    gains: dict[tuple[str, str, int], float] = {}
    for name, own in SPECIALISTS.items():
        for arm in ARMS:
            agents = [(r["seed_index"], a) for r in runs if r["arm"] == arm for a in r["per_agent"]
                      if a["specialist"] == name]
            if not agents:
                continue
            datasets = sorted(k[5:] for k in agents[0][1]["eval_before"] if k != "eval_reward")

            def mean(key: str, ds: str) -> float:
                return statistics.fmean(a[key][f"eval_{ds}"] for _, a in agents)

            def gain(a: dict, which) -> float:
                return statistics.fmean(a["eval_after"][f"eval_{d}"] - a["eval_before"][f"eval_{d}"] for d in which)

            missing = [d for d in datasets if d not in own]
            per_seed: dict[int, list[float]] = {}
            for k, a in agents:
                per_seed.setdefault(k, []).append(gain(a, missing))
            gains.update({(name, arm, k): statistics.fmean(g) for k, g in per_seed.items()})
            out.setdefault(name, {})[arm] = {
                "agents": len(agents),
                "heldout_before": {d: round(mean("eval_before", d), 4) for d in datasets},
                "heldout_after": {d: round(mean("eval_after", d), 4) for d in datasets},
                "gain_own_datasets": statistics.fmean(gain(a, own) for _, a in agents),
                "gain_missing_datasets": statistics.fmean(gain(a, missing) for _, a in agents),
                "reward_first_fifth": statistics.fmean(
                    statistics.fmean(a["reward_local"][: max(1, len(a["reward_local"]) // 5)]) for _, a in agents),
                "reward_last_fifth": statistics.fmean(
                    statistics.fmean(a["reward_local"][-max(1, len(a["reward_local"]) // 5):]) for _, a in agents),
                "swarm_groups_trained": statistics.fmean(x for _, a in agents for x in a["swarm_groups"]),
                "skipped_updates": statistics.fmean(sum(a["skipped_update"]) / len(a["skipped_update"]) for _, a in agents),
            }
        seeds = sorted({k for (n, arm, k) in gains if n == name and arm == "alone"}
                       & {k for (n, arm, k) in gains if n == name and arm == "shared"})
        if seeds:
            diffs = [gains[name, "shared", k] - gains[name, "alone", k] for k in seeds]
            out[name]["transfer_shared_minus_alone"] = {
                "seeds": len(seeds), "mean": statistics.fmean(diffs),
                "std": statistics.stdev(diffs) if len(diffs) > 1 else None}
    return out


def table(summary: dict) -> str:
    """Markdown: a row per specialist and arm, held-out accuracy before → after per dataset (* marks the
    datasets the specialist was warm-started on)."""
    first = next(v for arms in summary.values() for a, v in arms.items() if a in ARMS)
    datasets = list(first["heldout_before"])
    lines = ["| specialist | arm | " + " | ".join(datasets) + " | gain, own datasets | gain, missing datasets "
             "| swarm groups / update |", "|---|---|" + "---|" * (len(datasets) + 3)]
    for name, arms in summary.items():
        for arm, v in arms.items():
            if arm not in ARMS:
                continue
            cells = [f"{v['heldout_before'][d]:.2f} → {v['heldout_after'][d]:.2f}{'*' if d in SPECIALISTS[name] else ''}"
                     for d in datasets]
            lines.append(f"| {name} | {arm} | " + " | ".join(cells) + f" | {v['gain_own_datasets']:+.3f} "
                         f"| {v['gain_missing_datasets']:+.3f} | {v['swarm_groups_trained']:.2f} |")
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"benchmark": "hetero", "runs": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--agents", type=int, help="agents alternate between the specialists (default by mode)")
    ap.add_argument("--tasks", type=int, default=8, help="tasks per round and agent")
    # The embedded policy's rate: a specialist is loaded from a folder, and any other model's default is 1e-6
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--build-steps", type=int, default=300, help="warm-start steps of each specialist")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (separate processes)")
    ap.add_argument("--results", type=Path, help="results file (default by mode: bench/results/hetero[_quick|_full].json)")
    ap.add_argument("--child", nargs=3, metavar=("ARM", "SEED_INDEX", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--policies", help=argparse.SUPPRESS)
    args = ap.parse_args()
    name = "quick" if args.quick else "full" if args.full else "default"
    rounds, seeds, agents, stem = MODES[name]
    rounds, seeds, agents = args.rounds or rounds, args.seeds or seeds, args.agents or agents
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        run_one(args.child[0], int(args.child[1]), rounds, agents, args.tasks, args.lr, json.loads(args.policies),
                Path(args.child[2]))
        return
    path = args.results or RESULTS_DIR / f"{stem}.json"
    policies = {k: str(v) for k, v in build_policies(args.build_steps).items()}
    build = {k: json.loads((Path(v) / "build_info.json").read_text()) for k, v in policies.items()}
    todo = [(arm, k) for k in range(seeds) for arm in ARMS]
    doc = load_results(path)
    other = {run_key(r)[2:] for r in doc["runs"]} - {(rounds, agents, args.tasks, args.lr)}
    if other:  # the summary pools every run of a file: one configuration per file
        ap.error(f"{path} holds runs of another configuration (rounds, agents, tasks, lr) {sorted(other)}; "
                 f"pass --results for a new file")
    done = {run_key(r) for r in doc["runs"]}
    todo = [(arm, k) for arm, k in todo if (arm, k, rounds, agents, args.tasks, args.lr) not in done]
    print(f"{len(todo)} run(s) to do: {agents} agents, {rounds} rounds, lr {args.lr}", flush=True)
    def command(arm, k):
        return lambda out: [sys.executable, __file__, "--child", arm, str(k), str(out), "--rounds", str(rounds),
                            "--agents", str(agents), "--tasks", str(args.tasks), "--lr", str(args.lr),
                            "--policies", json.dumps(policies)]

    def on_done(key, run, seconds):
        arm, k = key
        doc = load_results(path)
        doc["runs"] = [r for r in doc["runs"] if run_key(r) != run_key(run)] + [run]
        doc["specialists"] = {k2: {"datasets": b["datasets"], "steps": b["steps"],
                                   "heldout": b["heldout_score_per_dataset"]} for k2, b in build.items()}
        doc["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "loadavg": os.getloadavg()}
        doc["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
        doc["summary"] = summarise(doc["runs"])
        save_results(path, doc)
        print(f"  done  {arm} seed {k} in {seconds:.0f} s", flush=True)

    failed = run_children([((arm, k), f"{arm} seed {k}", command(arm, k)) for arm, k in todo], args.jobs, on_done,
                          "hetero-")
    doc = load_results(path)
    if doc["runs"]:
        print(table(doc["summary"]))
        for n, v in doc["summary"].items():
            t = v.get("transfer_shared_minus_alone")
            if t:
                print(f"{n}: missing-dataset gain, shared minus alone: {t['mean']:+.3f} over {t['seeds']} seed(s)")
    if failed:
        sys.exit(f"{failed} run(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()

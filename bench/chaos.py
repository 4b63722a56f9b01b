"""Fault benchmark: random SIGKILL + restart of hivemind peers and of the bootstrap (the round keeper).

    nice -n 10 python bench/chaos.py --quick         # 3 peers, ~2 minutes of faults -> results/chaos.quick.{json,png}
    nice -n 10 python bench/chaos.py                 # 4 peers, 10 minutes of faults -> results/chaos.{json,png}
    python bench/chaos.py --minutes 3 --peers 5 --seed 7 --out /tmp/c.json

What runs: a bootstrap peer with `--coordinator` on a fixed port and identity (so a restart is the same peer
at the same address, as an operator would restart it) and N headless nodes (`python -m p2pswarm run`, the
embedded policy, 4 tasks a round, a checkpoint every round), all on 127.0.0.1 with the code this file
belongs to. After a warm-up (every node played a round), for `--minutes` a victim is drawn at random (the
bootstrap with probability `--boot-share`, and always for the second fault if the first hit a peer, else a
peer), SIGKILLed (its Python process only, as a crash or OOM kill: its p2pd must go by itself), and
restarted with the same command after `--down` seconds (uniform). The next fault comes `--gap` seconds
(uniform) after the victim plays again (a round finished; for the bootstrap, its clock logged) or after
`--wait-back` seconds: a restart takes tens of seconds on a busy machine, and a fault on a node still
starting would show nothing about healing. Then the swarm is watched for `--settle` seconds with no faults,
and everything is stopped.

What is recorded, from the files the nodes write (metrics.jsonl, events.jsonl) and the bootstrap's log, as a
monitor reads them every 0.5 s:
- per kill: rounds the victim lost (rounds the swarm played between its last round before the kill and its
  first after the restart; for the bootstrap, rounds the clock did not move while it was away is not a loss,
  the peers' skipped rounds are); rounds the other peers skipped from the kill until the swarm healed; the
  seconds from the restart until the victim hears the whole swarm again (a metrics row whose `peers_live`
  counts every other running peer; for the bootstrap: its status line counts every running peer and its
  clock advanced again), and until every running node does; censored (null, `healed: false`) when the next
  fault came first;
- partitions: live nodes are grouped by their clock (the round each peer plays; the keeper's: the round its
  clock is at), nodes more than `--tolerance` rounds apart are in different groups (see `partitions`); every interval with more than one group is one
  partition, with its groups and how long it lived (goal: none outliving 30 s);
- orphaned daemons: p2pd processes whose node was killed and that still ran 15 s later, and any p2pd of ours
  still running after the final stop (goal 0; they are killed then, and counted).

Everything started here runs in its own session and is killed by process group at the end, whatever
happens. The machine's load average is recorded: on a busy machine rounds are slower, not wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EXP = "chaos-bench"
BOOT = "boot"


# ---- pure functions (tests/test_bench_tools.py) ----------------------------------------------------------
def clock_groups(clocks: dict[str, int], tolerance: int) -> list[list[str]]:
    """Live nodes grouped by clock: sorted by round, a new group starts where the next node is more than
    `tolerance` rounds ahead of the previous one. One group means one swarm; nodes of one swarm with one
    keeper differ by a round or so while a round finishes."""
    groups: list[list[str]] = []
    last = None
    for name, r in sorted(clocks.items(), key=lambda kv: (kv[1], kv[0])):
        if last is None or r - last > tolerance:
            groups.append([])
        groups[-1].append(name)
        last = r
    return groups


def partitions(timeline: list[tuple[float, dict[str, int]]], tolerance: int = 2) -> list[dict]:
    """Intervals during which the live nodes formed more than one clock group.

    `timeline`: (time, {node: round it plays}) samples in time order, live nodes only. A partition starts at
    the first sample with two or more groups and ends at the first sample with one (its duration is the
    difference); one still open at the last sample ends there with `open: true`. Each records the groups
    seen at its start and the widest spread of rounds it reached."""
    out: list[dict] = []
    cur: dict | None = None
    for t, clocks in timeline:
        groups = clock_groups(clocks, tolerance)
        if len(groups) > 1:
            spread = max(clocks.values()) - min(clocks.values())
            if cur is None:
                cur = {"start": t, "groups": [{"nodes": g, "round": clocks[g[0]]} for g in groups],
                       "max_groups": len(groups), "max_round_spread": spread}
            cur["max_groups"] = max(cur["max_groups"], len(groups))
            cur["max_round_spread"] = max(cur["max_round_spread"], spread)
        elif cur is not None:
            cur.update(end=t, duration_s=round(t - cur["start"], 2), open=False)
            out.append(cur)
            cur = None
    if cur is not None:
        end = timeline[-1][0]
        cur.update(end=end, duration_s=round(end - cur["start"], 2), open=True)
        out.append(cur)
    return out


def first_time(samples: list[tuple[float, object]], since: float, cond) -> float | None:
    """The first sample time at or after `since` whose value satisfies `cond`, or None."""
    for t, v in samples:
        if t >= since and cond(v):
            return t
    return None


# ---- processes -----------------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st and int(st[1]) == pid:
                out.append(int(d.name))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One node (a peer or the bootstrap) and every incarnation of it: the command is the same each time."""

    name: str
    cmd: list[str]
    proc: subprocess.Popen | None = None
    started: list[float] = field(default_factory=list)
    daemons: set[int] = field(default_factory=set)  # p2pd pids seen under any incarnation
    log_pos: int = 0
    metrics_pos: int = 0


class Chaos:
    """The swarm under faults: starts, kills, restarts and watches nodes; every process in its own session."""

    def __init__(self, work: Path, peers: int, code: Path):
        self.work = work
        self.env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.port = free_port()
        py = sys.executable
        self.boot = Node(BOOT, [py, "-m", "bootstrap", "--host", "127.0.0.1", "--port", str(self.port), "--identity",
                                str(work / "boot.key"), "--experiment", EXP, "--coordinator", "--status-every", "1"])
        self.boot_addr = ""
        self.peers = [Node(f"p{i}", []) for i in range(peers)]
        self.all_procs: list[subprocess.Popen] = []
        # what the monitor saw: (t, value) series
        self.rows: dict[str, list[dict]] = {p.name: [] for p in self.peers}  # metrics rows, each with its read time
        self.boot_status: list[tuple[float, int]] = []  # peers connected, per status line
        self.boot_clock: list[tuple[float, int]] = []  # "round clock advanced to round N" / "resumed at"
        self.timeline: list[tuple[float, dict[str, int]]] = []

    def peer_cmd(self, name: str) -> list[str]:
        return [sys.executable, "-m", "p2pswarm", "run", "--headless", "--experiment", EXP, "--node-id", name,
                "--rounds", "1000000", "--host", "127.0.0.1", "--output-dir", str(self.work / "runs" / name),
                "--initial-peers", self.boot_addr,
                *[a for kv in ("eval_every=0", "threads=1", "tasks_per_round=4", "collect_timeout=8", "checkpoint_every=1")
                  for a in ("--set", kv)]]

    def start(self, node: Node) -> None:
        node.proc = subprocess.Popen(node.cmd, stdout=open(self.work / f"{node.name}.log", "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=self.env, cwd=self.work)
        node.started.append(time.time())
        self.all_procs.append(node.proc)

    def start_swarm(self, timeout: float = 180) -> None:
        self.start(self.boot)
        deadline = time.time() + timeout
        while not self.boot_addr:
            m = re.search(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", (self.work / "boot.log").read_text(errors="replace"))
            if m:
                self.boot_addr = m.group(1)
            elif time.time() > deadline or self.boot.proc.poll() is not None:
                raise RuntimeError("bootstrap did not start:\n" + (self.work / "boot.log").read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        for p in self.peers:
            p.cmd = self.peer_cmd(p.name)
            self.start(p)

    def kill(self, node: Node) -> list[int]:
        """SIGKILL the node's Python process alone (its p2pd must exit by itself); the daemons it had."""
        daemons = [c for c in children(node.proc.pid) if alive(c)]
        node.daemons.update(daemons)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=30)
        return daemons

    def running(self) -> list[Node]:
        return [n for n in self.peers if n.proc is not None and n.proc.poll() is None]

    # ---- the monitor ----------------------------------------------------------------------------------------
    def poll(self) -> None:
        now = time.time()
        for n in [self.boot, *self.peers]:
            if n.proc is not None and n.proc.poll() is None:
                n.daemons.update(children(n.proc.pid))
        text = read_from(self.work / "boot.log", self.boot)
        for line in text.splitlines():
            if m := re.search(r"status: (\d+) peer\(s\) connected", line):
                self.boot_status.append((now, int(m.group(1))))
            if m := re.search(r"round clock (?:advanced to|resumed at) round (\d+)", line):
                self.boot_clock.append((now, int(m.group(1))))
        clocks = {}
        for p in self.peers:
            f = self.work / "runs" / p.name / "metrics.jsonl"
            try:
                with open(f, "rb") as fh:
                    fh.seek(p.metrics_pos)
                    chunk = fh.read()
            except FileNotFoundError:
                chunk = b""
            end = chunk.rfind(b"\n") + 1
            p.metrics_pos += end
            for line in chunk[:end].splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                comm = row.get("comm", {}) if isinstance(row.get("comm"), dict) else {}
                self.rows[p.name].append({"seen": now, "round": row.get("round"), "time": row.get("time"),
                                          "peers_live": comm.get("peers_live"), "swarm_peers": row.get("swarm_peers"),
                                          "swarm_groups_received": row.get("swarm_groups_received"),
                                          "incarnation": len(p.started)})
            rows = self.rows[p.name]
            # a node plays the round after the last one it finished; one restarted but not yet playing is left out
            if p.proc is not None and p.proc.poll() is None and rows and rows[-1]["incarnation"] == len(p.started):
                clocks[p.name] = rows[-1]["round"] + 1
        # the keeper's clock is one more: a restarted keeper stuck on an old round is a swarm split in two
        since = self.boot.started[-1] if self.boot.started else now
        kept = [r for t, r in self.boot_clock if t >= since]
        if self.boot.proc is not None and self.boot.proc.poll() is None and kept:
            clocks[BOOT] = kept[-1]
        self.timeline.append((now, clocks))

    def close(self) -> dict:
        """Stop everything (SIGTERM, then SIGKILL by group) and count p2pd daemons that outlived their node."""
        for p in self.all_procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for p in self.all_procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        time.sleep(3)  # a daemon whose node just exited gets a moment to notice
        for n in [self.boot, *self.peers]:
            if n.proc is not None and n.proc.poll() is None:
                n.daemons.update(children(n.proc.pid))
        left = {n.name: sorted(d for d in n.daemons if alive(d) and is_p2pd(d)) for n in [self.boot, *self.peers]}
        for p in self.all_procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
        for pids in left.values():
            for d in pids:  # daemons of nodes this bench started: ours to end, one by one
                try:
                    os.kill(d, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return {k: v for k, v in left.items() if v}


def playing_again(ch: Chaos, node: Node, since: float) -> bool:
    """A restarted peer finished a round; a restarted bootstrap logged its clock again."""
    if node is ch.boot:
        return any(t >= since for t, _ in ch.boot_clock)
    return any(r["seen"] >= since for r in ch.rows[node.name])


def is_p2pd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"p2pd")
    except OSError:
        return False


def read_from(path: Path, node: Node) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(node.log_pos)
            chunk = fh.read()
    except FileNotFoundError:
        return ""
    end = chunk.rfind(b"\n") + 1
    node.log_pos += end
    return chunk[:end].decode(errors="replace")


# ---- analysis ---------------------------------------------------------------------------------------------
def analyse_kill(ch: Chaos, k: dict, until: float) -> dict:
    """Fill in one kill's effects, looking from its restart up to `until` (the next fault, or the end)."""
    victim, t_kill, t_up = k["victim"], k["killed_at"], k["restarted_at"]
    running = [p.name for p in ch.peers]  # every peer runs again once the victim is back (one fault at a time)

    def hears_all(name: str):
        rows = [r for r in ch.rows[name] if r["seen"] >= t_up and r["seen"] <= until and r["peers_live"] is not None
                and r["peers_live"] >= len(running) - 1]
        return rows[0]["seen"] if rows else None

    if victim == BOOT:
        status = first_time(ch.boot_status, t_up, lambda v: v >= len(running))
        clock0 = max((r for t, r in ch.boot_clock if t < t_kill), default=None)
        moved = first_time(ch.boot_clock, t_up, lambda v: clock0 is None or v > clock0)
        victim_heard = max(status, moved) if status and moved and max(status, moved) <= until else None
        k["clock_moved_again_s"] = round(moved - t_up, 1) if moved and moved <= until else None
        k["victim_rounds_lost"] = None
        back = first_time(ch.boot_clock, t_up, lambda v: True)
    else:
        victim_heard = hears_all(victim)
        before = [r["round"] for r in ch.rows[victim] if r["seen"] <= t_kill]
        # not cut at the next fault: a fault elsewhere does not change which rounds this one missed
        after = [r for r in ch.rows[victim] if r["seen"] > t_up]
        k["victim_rounds_lost"] = (after[0]["round"] - before[-1] - 1) if before and after else None
        back = after[0]["seen"] if after else None
    # start-up on a busy machine (imports, model, p2pd) is most of a restart: apart from the healing
    k["victim_playing_again_s"] = round(back - t_up, 1) if back else None
    others = [p for p in running if p != victim]
    heard = [hears_all(p) for p in others] + [victim_heard]
    all_heard = max(heard) if all(h is not None for h in heard) else None
    k["victim_hears_swarm_s"] = round(victim_heard - t_up, 1) if victim_heard else None
    k["all_hear_swarm_s"] = round(all_heard - t_up, 1) if all_heard else None
    k["healed"] = all_heard is not None
    end = all_heard or until
    skipped = 0
    for p in others:
        for e in events_of(ch.work / "runs" / p / "events.jsonl"):
            if e.get("kind") == "rounds_skipped" and t_kill <= e.get("time", 0) <= end:
                skipped += e["count"] if isinstance(e.get("count"), int) else len(e.get("skipped", []))
    k["others_rounds_skipped"] = skipped
    return k


def events_of(path: Path) -> list[dict]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def plot(result: dict, timeline: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["faults_started_at"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    names = sorted({n for _, c in timeline for n in c} - {BOOT})
    for i, name in enumerate(names):  # nodes on one clock overlap: a small offset keeps each visible
        xs = [t - t0 for t, c in timeline if name in c]
        ys = [c[name] + 0.6 * i for t, c in timeline if name in c]
        ax.plot(xs, ys, ".", ms=2, label=f"{name} (+{0.6 * i:.1f})" if i else name)
    xs = [t - t0 for t, c in timeline if BOOT in c]
    ax.plot(xs, [c[BOOT] for t, c in timeline if BOOT in c], "k.", ms=1.5, alpha=.7, label="keeper's clock")
    for k in result["kills"]:
        ax.axvspan(k["killed_at"] - t0, k["restarted_at"] - t0, color="red" if k["victim"] == BOOT else "grey", alpha=.2)
    for p in result["partitions"]:
        ax.axvspan(p["start"] - t0, p["end"] - t0, ymin=0, ymax=0.04, color="purple")
    ax.set_xlabel("seconds since the first fault (grey: a peer down, red: the bootstrap down, purple: partition)")
    ax.set_ylabel("round each peer plays")
    ax.legend(fontsize=7, markerscale=4)
    m = result["machine"]
    ax.set_title(f"p2pswarm under faults ({result['code']['label']}): {len(result['kills'])} kills, "
                 f"{m['cpus']} cores, load {m['loadavg_start'][0]}→{m['loadavg_end'][0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def code_label() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "p2pswarm", "bootstrap"))  # the code the nodes run, not bench/
    return {"label": rev + ("-dirty" if dirty else ""), "commit": git("rev-parse", "HEAD"), "branch": git("branch", "--show-current")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 peers, 2 minutes of faults")
    ap.add_argument("--minutes", type=float, help="minutes of faults (default 10; quick 2)")
    ap.add_argument("--peers", type=int, help="peer processes (default 4; quick 3)")
    ap.add_argument("--gap", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="seconds from a restart to the next kill (default 20 60; quick 15 30)")
    ap.add_argument("--down", type=float, nargs=2, default=(2.0, 10.0), metavar=("MIN", "MAX"),
                    help="seconds a victim stays dead (default 2 10)")
    ap.add_argument("--boot-share", type=float, default=0.3, help="probability that a victim is the bootstrap")
    ap.add_argument("--settle", type=float, default=90.0, help="seconds watched without faults at the end")
    ap.add_argument("--wait-back", type=float, default=120.0,
                    help="the next fault's gap counts from when the last victim plays again, or this many seconds")
    ap.add_argument("--tolerance", type=int, default=2, help="rounds apart that still count as one clock")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, run folders)")
    ap.add_argument("--replot", type=Path, metavar="JSON", help="redraw the PNG beside a result JSON, then exit")
    args = ap.parse_args()
    if args.replot:
        res = json.loads(args.replot.read_text())
        t0 = res["faults_started_at"]
        plot(res, [(t0 + t, c) for t, c in res["timeline"]], args.replot.with_suffix(".png"))
        return
    minutes = args.minutes if args.minutes is not None else (2.0 if args.quick else 10.0)
    n = args.peers or (3 if args.quick else 4)
    gap = args.gap or ((15.0, 30.0) if args.quick else (20.0, 60.0))
    out = args.out or RESULTS / ("chaos.quick.json" if args.quick else "chaos.json")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    load0 = os.getloadavg()
    t_begin = time.time()
    ch = Chaos(work, n, ROOT)
    kills: list[dict] = []
    orphans_after_kill: list[dict] = []
    left: dict = {}
    faults_at = None
    try:
        ch.start_swarm()
        print(f"bootstrap {ch.boot_addr}; {n} peers starting (work dir {work})", flush=True)
        deadline = time.time() + 600
        while not all(ch.rows[p.name] for p in ch.peers):  # warm-up: every peer finished a round
            if time.time() > deadline:
                raise RuntimeError(f"peers did not play a round in 600 s; see {work}")
            ch.poll()
            time.sleep(0.5)
        faults_at = time.time()
        end_faults = faults_at + 60 * minutes
        print(f"warm-up done in {faults_at - t_begin:.0f} s; faults for {minutes} min", flush=True)
        next_kill: float | None = time.time() + rng.uniform(*gap)
        back_from: tuple[Node, float] | None = None  # the last victim and its restart time, until it plays again
        pending_orphans: list[tuple[float, str, list[int]]] = []
        while True:
            now = time.time()
            ch.poll()
            for item in [x for x in pending_orphans if now >= x[0]]:
                pending_orphans.remove(item)
                still = [d for d in item[2] if alive(d) and is_p2pd(d)]
                if still:
                    orphans_after_kill.append({"victim": item[1], "daemons": still})
                    print(f"  orphaned p2pd of {item[1]}: {still}", flush=True)
            if now >= end_faults and not pending_orphans:
                break
            if back_from is not None and (playing_again(ch, *back_from) or now - back_from[1] > args.wait_back):
                back_from = None  # the gap to the next fault counts from here, so each fault's effect shows
                next_kill = now + rng.uniform(*gap)
            if next_kill is not None and now >= next_kill and now < end_faults:
                first_boot = len(kills) == 1 and kills[0]["victim"] != BOOT  # the keeper goes down at least once
                victim = ch.boot if first_boot or rng.random() < args.boot_share else rng.choice(ch.peers)
                down = rng.uniform(*args.down)
                daemons = ch.kill(victim)
                t_kill = time.time()
                print(f"{t_kill - faults_at:6.1f} s: SIGKILL {victim.name} (p2pd {daemons}), back in {down:.1f} s", flush=True)
                pending_orphans.append((t_kill + 15, victim.name, daemons))
                t_back = t_kill + down
                while time.time() < t_back:
                    ch.poll()
                    time.sleep(0.5)
                ch.start(victim)
                kills.append({"victim": victim.name, "killed_at": t_kill, "restarted_at": time.time(), "down_s": round(down, 1),
                              "daemons_at_kill": len(daemons)})
                back_from, next_kill = (victim, time.time()), None
            time.sleep(0.5)
        print(f"faults over; settling for {args.settle:.0f} s", flush=True)
        t_settle = time.time() + args.settle
        while time.time() < t_settle:
            ch.poll()
            time.sleep(0.5)
    finally:
        left = ch.close()
        t_end = time.time()
        if args.keep:
            print(f"work directory kept: {work}")
    for i, k in enumerate(kills):
        until = kills[i + 1]["killed_at"] if i + 1 < len(kills) else t_end
        analyse_kill(ch, k, until)
        print(f"  kill {i}: {k['victim']}: playing again {k['victim_playing_again_s']} s, healed {k['healed']}, victim hears swarm {k['victim_hears_swarm_s']} s, all "
              f"{k['all_hear_swarm_s']} s, victim lost {k['victim_rounds_lost']} round(s), others skipped "
              f"{k['others_rounds_skipped']}", flush=True)
    timeline = [(t, c) for t, c in ch.timeline if faults_at and t >= faults_at]
    parts = partitions(timeline, args.tolerance)
    rel = lambda t: round(t - faults_at, 1) if faults_at else None  # noqa: E731
    for k in kills:
        for key in ("killed_at", "restarted_at"):
            k[key + "_s"] = rel(k[key])
    heal = [k["all_hear_swarm_s"] for k in kills if k["all_hear_swarm_s"] is not None]
    last_clock = {p.name: (ch.rows[p.name][-1]["round"] if ch.rows[p.name] else None) for p in ch.peers}
    result = {
        "benchmark": "chaos", "command": "python " + " ".join(["bench/chaos.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_label(), "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": [round(x, 1) for x in load0],
                    "loadavg_end": [round(x, 1) for x in os.getloadavg()]},
        "settings": {"peers": n, "minutes": minutes, "gap_s": gap, "down_s": list(args.down), "boot_share": args.boot_share,
                     "settle_s": args.settle, "tolerance_rounds": args.tolerance, "seed": args.seed,
                     "node_settings": ["eval_every=0", "threads=1", "tasks_per_round=4", "collect_timeout=8", "checkpoint_every=1"]},
        "summary": {
            "kills": len(kills), "bootstrap_kills": sum(k["victim"] == BOOT for k in kills),
            "healed": sum(k["healed"] for k in kills),
            "all_hear_swarm_s": {"p50": median(heal), "max": max(heal, default=None)},
            "victim_playing_again_s_p50": median([k["victim_playing_again_s"] for k in kills if k["victim_playing_again_s"]]),
            "victim_rounds_lost_total": sum(k["victim_rounds_lost"] or 0 for k in kills),
            "others_rounds_skipped_total": sum(k["others_rounds_skipped"] for k in kills),
            "partitions": len(parts), "partitions_over_30s": sum(p["duration_s"] > 30 for p in parts),
            "longest_partition_s": max((p["duration_s"] for p in parts), default=0.0),
            "partition_open_at_end": any(p["open"] for p in parts),
            "orphaned_daemons_after_kill": sum(len(o["daemons"]) for o in orphans_after_kill),
            "orphaned_daemons_after_stop": sum(len(v) for v in left.values()),
            "last_round_per_peer": last_clock,
            "rounds_played_during_faults": {p.name: sum(1 for r in ch.rows[p.name] if faults_at and r["seen"] >= faults_at)
                                            for p in ch.peers},
        },
        "kills": kills, "partitions": [p | {"start_s": rel(p["start"]), "end_s": rel(p["end"])} for p in parts],
        "orphans_after_kill": orphans_after_kill, "orphans_after_stop": left,
        "faults_started_at": faults_at, "wall_s": round(time.time() - t_begin, 1),
        # every 2nd sample: [seconds since the first fault, {node: round it plays}] (boot: the keeper's clock)
        "timeline": [[rel(t), c] for t, c in timeline[::2]],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(result, timeline, out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - the JSON is the result; the picture is a convenience
        print(f"no plot: {e}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


def median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


if __name__ == "__main__":
    main()

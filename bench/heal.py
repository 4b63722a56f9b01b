"""How fast the swarm heals after restarts: a bootstrap (keeper) and N peers on 127.0.0.1; the bootstrap is
SIGKILLed and restarted on its port and identity `--kills` times, then one peer is SIGKILLed and restarted.

    python bench/heal.py                           # 3 peers, 3 bootstrap kills of 10 s each, this tree's code
    python bench/heal.py --root /tmp/old-checkout  # the same against another checkout (e.g. before the fix)

Per bootstrap restart it records the seconds from the restart (its address printed) until
  - reached:  every peer logged "reached peer <bootstrap> again" (None on code without re-dialling),
  - trainers: the bootstrap's status line counts every peer as a trainer again,
  - clock:    its clock advanced past the round the swarm played when it came back,
and for the restarted peer the seconds until its metrics show groups from every other peer. None: not
within --wait seconds (a partition that outlived it). Appends one entry to bench/results/heal.json, with the
machine's load average (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "heal.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--down", type=float, default=10.0, help="seconds the bootstrap stays down")
    ap.add_argument("--wait", type=float, default=120.0, help="the longest wait for each measure")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="the checkout to run")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(args.root / "tests"))
    import helpers as H  # the checkout's own harness: its processes run its code (PYTHONPATH=root)

    tmp = Path(tempfile.mkdtemp(prefix="heal-"))
    procs = H.Procs(tmp)
    names = [f"p{i}" for i in range(args.peers)]
    load = [os.getloadavg()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def until(conds: dict, t0: float, wait: float = args.wait) -> dict:
        """Seconds from t0 until each condition first held (polled together); None if not within `wait`."""
        got = dict.fromkeys(conds)
        while True:
            for k, cond in conds.items():
                if got[k] is None and cond():
                    got[k] = round(time.monotonic() - t0, 1)
            if all(v is not None for v in got.values()) or time.monotonic() - t0 > wait:
                return got
            time.sleep(0.2)

    def groups(name: str) -> dict[str, int]:
        rows = H.metrics(tmp, name)
        return {n: r.get("groups", 0) for n, r in H.by_name(rows[-1]["comm"]["per_peer"]).items()} if rows else {}

    def played(name: str) -> int:
        rows = H.metrics(tmp, name)
        return rows[-1]["round"] if rows else -1

    cycles, peer_restart = [], None
    try:
        boot = H.start_bootstrap(procs, "boot", "--coordinator", "--port", str(port), "--status-every", "1")
        boot_id = boot.rsplit("/", 1)[1]
        for n in names:
            procs.start(n, H.peer_cmd(tmp, n, boot, H.ENDLESS))
        H.wait_until(lambda: all(len(groups(n)) >= args.peers - 1 for n in names), H.HANG, "a swarm hearing itself")
        current = "boot"
        for k in range(args.kills):
            daemons = H.children(procs[current].pid)
            procs[current].send_signal(signal.SIGKILL)
            procs[current].wait(timeout=30)
            H.wait_until(lambda: not any(H.alive(d) for d in daemons), 60, "exit of the bootstrap's p2pd")
            time.sleep(args.down)
            current = f"boot{k + 2}"
            reached_before = {n: procs.log(n).count(f"reached peer {boot_id} again") for n in names}
            H.start_bootstrap(procs, current, "--coordinator", "--identity", "boot.key", "--port", str(port),
                              "--status-every", "1")
            t0 = time.monotonic()
            swarm_round = max(played(n) for n in names)
            log = lambda: procs.log(current)  # noqa: E731
            cycles.append({"down_s": args.down, "swarm_round": swarm_round, **until({
                "reached_s": lambda: all(procs.log(n).count(f"reached peer {boot_id} again") > reached_before[n]
                                         for n in names),
                "trainers_s": lambda: re.search(rf"status: \d+ peer\(s\) connected, {args.peers} trainer", log()),
                "clock_s": lambda: any(int(r) > swarm_round + 1
                                       for r in re.findall(r"round clock advanced to round (\d+)", log())),
            }, t0)})
            print(json.dumps(cycles[-1]), flush=True)
        victim = names[-1]
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=30)
        rows = len(H.metrics(tmp, victim))
        procs.start(victim + "-again", H.peer_cmd(tmp, victim, boot, H.ENDLESS))
        others = set(names) - {victim}
        # From the start of the process: model loading and p2pd included.
        peer_restart = until({"hears_all_s": lambda: len(H.metrics(tmp, victim)) > rows
                              and all(groups(victim).get(o, 0) > 0 for o in others)}, time.monotonic(), args.wait + 120)
        print(json.dumps(peer_restart), flush=True)
    finally:
        procs.kill_all()
        load.append(os.getloadavg())
    commit = subprocess.run(["git", "-C", str(args.root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    entry = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "root": str(args.root), "commit": commit,
             "peers": args.peers, "wait_s": args.wait, "bootstrap_restarts": cycles, "peer_restart": peer_restart,
             "loadavg_start_end": load, "cpus": os.cpu_count()}
    print(json.dumps(entry, indent=1))
    if not args.no_save:
        history = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        RESULTS.write_text(json.dumps(history + [entry], indent=1) + "\n")


if __name__ == "__main__":
    main()

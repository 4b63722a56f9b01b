"""What the gossip exchange costs each peer, counted: N peers in this process (each its own p2pd and
HivemindComm, exactly the trainer's publish/collect), R rounds of one stage, every peer publishing a batch
of about SIZE bytes then collecting with `sample_peers` = K.

    python bench/gossip_local.py                 # N = 8 and 16, K = 8, 5 rounds, 30 KB batches
    python bench/gossip_local.py --peers 8 16 24 --rounds 5 --k 4

Per N it records: delivered_fraction (valid batches / min(K, N - 1) wanted, every peer, every round), the
exchange's added time per collect (p50 / p95: noisy on a shared machine, so the load average is recorded
with it), and per peer and round: topic messages and bytes sent and received, pulls, catch-ups, payload
bytes pulled and served. The counts follow from the protocol; the times from the machine. Appends to
bench/results/gossip_local.json. bench/swarm_exchange.py is the side-by-side with the old DHT path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pswarm.comm.hivemind.manager import HivemindComm  # noqa: E402
from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig  # noqa: E402
from p2pswarm.identity import Identity  # noqa: E402
from p2pswarm.types import Group, Task  # noqa: E402

SWARM = "bench-gossip"
COUNTS = ("gossip_sent", "gossip_bytes_sent", "gossip_received", "gossip_bytes_in", "pulls", "catchups", "bytes_served")


def batch(peer: str, size: int, r: int) -> list[Group]:
    text = ("<answer>2</answer> " + "x" * size)[: max(20, size // 16)]
    return [Group(Task(f"t{r}-{i}", "basic_arithmetic", "What is 1+1?", "2"), [text] * 4, peer, [1.0, 0.0, 1.0, 0.0])
            for i in range(4)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def run(n: int, rounds: int, k: int, size: int, timeout: float) -> dict:
    d = Path(tempfile.mkdtemp(prefix="gossip-bench-"))
    comms: list[HivemindComm] = []
    try:
        for i in range(n):
            ident = Identity.load_or_create(d / f"p{i}.key")
            boot = comms[0].node.maddrs[:1] if comms else []
            node = HivemindNode(ident, d / f"p{i}.key", NetConfig(host="127.0.0.1", initial_peers=boot)).start()
            comms.append(HivemindComm(node, SWARM, name=f"p{i}", timeout=timeout, sample_peers=k, seed=i))
        # Everyone hears everyone before the first round (membership decides how many a collect waits for).
        t0 = time.time()
        while time.time() - t0 < 120 and not all(len(c.node.call(c.fetch_members(), timeout=10)) == n for c in comms):
            time.sleep(0.5)
        before = [dict(c.counters()) for c in comms]
        added, delivered, wanted = [], 0, 0
        for r in range(rounds):
            for c in comms:
                c.publish(r, 0, batch(c.peer_id, size, r))
            out: dict[int, tuple[int, float]] = {}

            def collect(i: int, c: HivemindComm = None) -> None:
                c = comms[i]
                t = time.monotonic()
                got = c.collect(r, 0)
                out[i] = (len({g.peer for g in got}), time.monotonic() - t)

            threads = [threading.Thread(target=collect, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, (peers, secs) in out.items():
                delivered += min(peers, min(k or n - 1, n - 1))
                wanted += min(k or n - 1, n - 1)
                added.append(secs)
        after = [c.counters() for c in comms]
        per_peer = {key: statistics.mean((a.get(key, 0) - b.get(key, 0)) / rounds for a, b in zip(after, before))
                    for key in COUNTS}
        pulled = statistics.mean(sum(row.get("pulled_bytes", 0) for row in c.per_peer.values()) / rounds for c in comms)
        return {"n": n, "k": k, "rounds": rounds, "batch_bytes": comms[0].bytes_sent // max(1, comms[0].sent),
                "transport": "gossip", "delivered_fraction": round(delivered / max(1, wanted), 4),
                "exchange_s_p50": round(pct(added, 0.5), 3), "exchange_s_p95": round(pct(added, 0.95), 3),
                "per_peer_per_round": {**{k_: round(v, 1) for k_, v in per_peer.items()}, "pulled_bytes": round(pulled, 1)},
                "load_avg": os.getloadavg()}
    finally:
        for c in reversed(comms):
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--size", type=int, default=30_000)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gossip_local.json")
    args = ap.parse_args()
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    runs = []
    for n in args.peers:
        res = run(n, args.rounds, args.k, args.size, args.timeout)
        print(json.dumps(res), flush=True)
        runs.append(res)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "revision": rev, "cpus": os.cpu_count(),
             "note": "N peers in one process on 127.0.0.1; times are noisy on a shared machine (load_avg)", "runs": runs}
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(old + [entry], indent=1) + "\n")


if __name__ == "__main__":
    main()

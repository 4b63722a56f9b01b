"""SIMULATION (simulated time, no network): the gossip exchange at 1,000 and 10,000 peers.

    python bench/sim_gossip.py                      # 1,000 and 10,000 peers, two link scenarios -> results/sim_gossip.json
    python bench/sim_gossip.py --peers 1000 --rounds 6 --out /tmp/s.json
    python bench/sim_gossip.py --quick              # 1,000 peers, one scenario (seconds)

A discrete-event model of the design in issue #13, not a measurement: every number it prints follows from
the model below and from the calibration it records (`calibration` in the JSON: each input, its value and
where it came from). Real runs are in bench/results/swarm_exchange.json (8 processes, up to 64 in-process
peers); this extrapolates to sizes this machine cannot run.

The model, per round:
- GossipSub as go-libp2p-pubsub v0.10.0 runs it: a mesh of degree D (near D-regular random graph, built with
  the configuration model) over the live peers; a message goes to every mesh neighbour but the one it came
  from, on first receipt (no IDONTWANT in that version, so every mesh link carries full duplicates); lazy
  gossip: every heartbeat each peer sends IHAVE (ids seen in the last `history_gossip` heartbeats, at most
  5,000) to Dlazy other peers, and a peer missing a message fetches it with IWANT, modelled as an extra edge
  of weight U(0, heartbeat) + 2 hops. Each hop of each message is lost with probability `loss`.
  Arrival times are shortest paths (scipy's Dijkstra) from a sample of publishers (`--sources`), each with its
  own lost edges; a receiver's view is extrapolated from those sampled announcements (uniform sampling
  makes that unbiased).
- Topic traffic per round, by the code's cadence (`--cadence`): `new` (p2pswarm/comm/hivemind/manager.py
  since issue #13's traffic work): one announcement that doubles as the heartbeat, a heartbeat at the
  finished round, and one after every `member_refresh_s` of silence, so max(2, round_s / member_refresh_s)
  messages a peer (no spare copy in a formed mesh); `old` (before it): the announcement, a heartbeat beside
  it, the announcement again mid-round, a heartbeat at the finished round and one every `member_refresh_s`
  whatever else went out. Message sizes are the code's (`announce_bytes`, `heartbeat_bytes`); the
  keeper's clock goes out once a round.
- Each peer publishes at round start + its work time (uniform within ±`jitter` of `work_s`), then collects:
  it waits until it has seen a `quorum` fraction of the previous round's announcers, at the latest until
  `pull_reserve_s` before its deadline (`collect_timeout` after its publish), samples K announcers uniformly among those seen (peers with a history of valid batches first; at most
  `fresh_share` of K may be fresh identities), pulls each (latency from the calibration; a dead announcer
  costs `dead_pull_s`, then a fresh draw replaces it) until K valid batches or the deadline.
- Churn: at round `churn_round`, a `churn` fraction of the peers die just after announcing (their payloads
  cannot be pulled) and as many fresh peers join at the next round; the mesh is repaired one heartbeat later
  (peers below Dlo graft back to D), so that round's own announcements travel on the damaged mesh.
- Rounds to converge after churn: rounds from the churn until, in one round, delivery of wanted batches is
  >= 99%, >= 99% of the sampled announcements reach every live peer, no live peer's mesh degree is below Dlo,
  and every newcomer has a history (someone pulled a valid batch from it).

Per-peer messages are application messages (pubsub messages incl. duplicates and IHAVE, pull requests and
responses); bytes include the calibrated framing overhead. About 10 s of CPU at 10,000 peers (8 rounds);
the JSON records CPU and wall seconds per run, and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MSG_ID_BYTES = 46  # pubsub message id: author peer id (38 B) + seqno (8 B)
PUBSUB_FRAME_BYTES = 150  # per pubsub message: from, seqno, topic, 64 B signature, key omitted (inline Ed25519)
MAX_IHAVE = 5000  # go-libp2p-pubsub GossipSubMaxIHaveLength


@dataclass
class Params:
    peers: int = 1000
    rounds: int = 8
    sample_peers: int = 8  # K
    D: int = 6
    Dlo: int = 5
    Dlazy: int = 6
    heartbeat_s: float = 1.0
    history_gossip: int = 3
    loss: float = 0.001  # per hop (an assumption: loopback loses nothing, the internet does)
    link_ms: float = 0.0  # one-way network latency added to every hop and pull
    bandwidth_mb_s: float = 0.0  # per-peer link for payloads (0: the calibrated loopback pull time alone)
    cadence: str = "new"  # which code's topic cadence: "new" or "old" (see the docstring)
    announce_bytes: int = 137  # len(gossip.announcement(...)) of a 30 KB batch, heartbeat fields in (new); 101 without (old)
    heartbeat_bytes: int = 69  # len(gossip.heartbeat(...)), default-valued fields left out (new); 92 all written (old)
    member_refresh_s: float = 5.0  # gossip.MEMBER_REFRESH
    work_s: float = 20.0  # time from round start to publish (generation)
    jitter: float = 0.3
    collect_timeout: float = 10.0
    pull_reserve_s: float = 2.0  # the cutoff comes this long before the deadline at the latest: time to pull
    quorum: float = 0.9
    fresh_share: float = 0.25
    dead_pull_s: float = 1.0
    churn: float = 0.10
    churn_round: int = 3
    sources: int = 48
    seed: int = 0
    calibration: dict = field(default_factory=dict)


def topic_cadence(p: Params, round_s: float) -> tuple[float, float]:
    """(announcements, separate heartbeats) one peer publishes in a round of `round_s` seconds."""
    periodic = round_s / p.member_refresh_s
    if p.cadence == "old":
        return 2.0, 1.0 + 1.0 + periodic  # beside the announcement, at the finished round, every period
    return 1.0, max(2.0, periodic) - 1.0


# ---- calibration ---------------------------------------------------------------------------------------------
def calibrate(paths: list[Path]) -> dict:
    """Inputs taken from the real runs (bench/results/swarm_exchange*.json), each with its source; defaults
    (with the reason) where a file lacks the field."""
    cal = {
        "payload_bytes": {"value": 27421, "source": "default: 30KB payload of bench/swarm_exchange.py (8 groups x 4 x 800 chars)"},
        "pull_ms_p50": {"value": 4.9, "source": "default: swarm_exchange.json N=2 30KB pull_and_check_ms_p50 (2026-11-21)"},
        "pull_ms_p95": {"value": 15.0, "source": "default: assumed 3x p50"},
        "hop_ms": {"value": [1.5, 6.0], "source": "notes/scale.md probe: p2pd GossipSub 200 B-30 KB delivered in 1.5-6 ms on 127.0.0.1 (uniform per hop)"},
        "wire_overhead": {"value": 1.10, "source": "default: framing (noise, yamux, protobuf) ~10% over payload bytes"},
    }
    timing_from = None  # latencies from the first file with real runs (the full run before the quick one);
    for path in paths:  # the framing overhead from the first that metered bytes
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows = [e for e in res.get("exchange", []) if e.get("size") == "30KB" and e.get("delivery_fraction")]
        if not rows:
            continue
        big = max(rows, key=lambda e: e["n"])  # the most peers: the most load per pull
        src = f"{path.relative_to(ROOT)} ({res.get('date')}), N={big['n']} 30KB"
        # framing: from the 1 MB rows, where payloads dwarf the DHT polling that every row also carries
        mb = [e for e in res.get("exchange", []) if e.get("size") == "1MB" and e.get("per_peer_per_round")
              and e.get("transport") == "dht" and e["n"] > 1]
        if mb and "bytes_received" not in cal["wire_overhead"]:
            e = max(mb, key=lambda e: e["n"])
            pulled = (e["n"] - 1) * e["payload_bytes"]  # the old path pulls every other peer's batch
            cal["wire_overhead"] = {"value": round(e["per_peer_per_round"]["bytes_received"]["mean"] / pulled, 3),
                                    "bytes_received": True,
                                    "source": f"{path.relative_to(ROOT)} ({res.get('date')}), N={e['n']} 1MB per-peer TCP "
                                              "bytes received / (N-1) payloads (DHT polling included: an upper bound)"}
        if timing_from:
            continue
        timing_from = str(path.relative_to(ROOT))
        cal["payload_bytes"] = {"value": big["payload_bytes"], "source": src + " payload_bytes"}
        if big.get("pull_and_check_ms_p50"):
            cal["pull_ms_p50"] = {"value": big["pull_and_check_ms_p50"], "source": src + " pull_and_check_ms_p50"}
        if big.get("latency_ms", {}).get("p95") and big.get("latency_ms", {}).get("p50"):
            ratio = big["latency_ms"]["p95"] / big["latency_ms"]["p50"]
            cal["pull_ms_p95"] = {"value": round(cal["pull_ms_p50"]["value"] * ratio, 1),
                                  "source": src + " pull p50 x (latency p95 / p50)"}
    cal["wire_overhead"].pop("bytes_received", None)
    return cal


# ---- the model -------------------------------------------------------------------------------------------
def mesh(alive: np.ndarray, D: int, rng: np.random.Generator) -> set[tuple[int, int]]:
    """A near D-regular random graph over `alive` (configuration model; self-loops and duplicates dropped)."""
    stubs = np.repeat(alive, D)
    rng.shuffle(stubs)
    a, b = stubs[0::2], stubs[1::2]
    keep = a != b
    return {(min(x, y), max(x, y)) for x, y in zip(a[keep].tolist(), b[keep].tolist())}


def repair(edges: set, alive: np.ndarray, D: int, Dlo: int, rng: np.random.Generator) -> set:
    """Drop edges to dead peers; peers left below Dlo graft random live peers until they have D."""
    live = set(alive.tolist())
    edges = {e for e in edges if e[0] in live and e[1] in live}
    deg = np.zeros(int(alive.max()) + 1, dtype=int)
    for a, b in edges:
        deg[a] += 1
        deg[b] += 1
    for v in alive.tolist():
        while deg[v] < Dlo:
            u = int(rng.choice(alive))
            e = (min(u, v), max(u, v))
            if u != v and e not in edges:
                edges.add(e)
                deg[u] += 1
                deg[v] += 1
        while deg[v] < D and rng.random() < 0.5:  # grafting stops once at Dlo..D, as GossipSub's heartbeat does
            u = int(rng.choice(alive))
            e = (min(u, v), max(u, v))
            if u != v and e not in edges:
                edges.add(e)
                deg[u] += 1
                deg[v] += 1
    return edges


def arrival_times(p: Params, edges: set, alive: np.ndarray, srcs: np.ndarray, n_ids: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[source, node] seconds from each source's publish until the node has its message (inf: never)."""
    e = np.array(sorted(edges), dtype=np.int64).reshape(-1, 2)
    lazy_a = np.repeat(alive, p.Dlazy)
    lazy_b = rng.choice(alive, size=lazy_a.size)
    hop = lambda k: (rng.uniform(*p.calibration["hop_ms"]["value"], size=k) + p.link_ms) / 1000  # noqa: E731
    out = np.full((len(srcs), n_ids), np.inf)
    for i, s in enumerate(srcs):
        # both directions of each mesh edge, and the lazy (IHAVE -> IWANT) edges; lost hops removed
        ma, mb = np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]])
        w = hop(ma.size)
        lw = rng.uniform(0, p.heartbeat_s, size=lazy_a.size) + 2 * hop(lazy_a.size)
        a, b, ww = np.concatenate([ma, lazy_a]), np.concatenate([mb, lazy_b]), np.concatenate([w, lw])
        kept = rng.random(a.size) >= p.loss
        g = coo_matrix((ww[kept], (a[kept], b[kept])), shape=(n_ids, n_ids)).tocsr()
        out[i] = dijkstra(g, directed=True, indices=int(s))
    return out


def pull_time(p: Params, rng: np.random.Generator, k: int) -> np.ndarray:
    """Seconds for k pulls: lognormal through the calibrated p50 / p95, plus link latency and bandwidth."""
    p50, p95 = p.calibration["pull_ms_p50"]["value"] / 1000, p.calibration["pull_ms_p95"]["value"] / 1000
    sigma = max(1e-3, np.log(max(p95 / p50, 1.0001)) / 1.645)
    t = p50 * np.exp(sigma * rng.standard_normal(k)) + 2 * p.link_ms / 1000
    if p.bandwidth_mb_s:
        t = t + p.calibration["payload_bytes"]["value"] / (p.bandwidth_mb_s * 1e6)
    return t


def simulate(p: Params) -> dict:
    rng = np.random.default_rng(p.seed)
    n_ids = p.peers + int(np.ceil(p.peers * p.churn)) * max(1, p.rounds)  # room for newcomers
    alive = np.arange(p.peers)
    next_id = p.peers
    history = np.zeros(n_ids, dtype=bool)  # has delivered a valid batch that someone pulled
    history[:p.peers] = True  # the swarm has been running: its peers have a history
    edges = repair(mesh(alive, p.D, rng), alive, p.D, p.Dlo, rng)  # GossipSub grafts peers left below Dlo
    prev_announcers = p.peers
    payload = p.calibration["payload_bytes"]["value"]
    overhead = p.calibration["wire_overhead"]["value"]
    per_round = []
    newcomers: np.ndarray = np.array([], dtype=int)
    for r in range(p.rounds):
        t0 = time.time()
        n = alive.size
        work = p.work_s * (1 + rng.uniform(-p.jitter, p.jitter, size=n))  # publish time of each live peer
        dead_now = np.array([], dtype=int)
        damaged = edges
        if r == p.churn_round and p.churn > 0:
            dead_now = rng.choice(alive, size=int(round(n * p.churn)), replace=False)
            gone = set(dead_now.tolist())
            damaged = {e for e in edges if e[0] not in gone and e[1] not in gone}
        srcs_idx = rng.choice(n, size=min(p.sources, n), replace=False)
        srcs = alive[srcs_idx]
        arr = arrival_times(p, damaged, alive, srcs, n_ids, rng)  # [source, node id]
        # what each receiver has seen by time t: a sampled announcement is seen at publish(src) + arrival
        seen_at = work[srcs_idx][:, None] + arr[:, alive]  # [source, receiver index]
        dead_mask = np.isin(alive, dead_now)
        wanted_total = got_total = 0
        view_full = 0
        served = np.zeros(n_ids, dtype=int)
        collect_s = []
        alive_rcv = np.flatnonzero(~dead_mask)
        src_dead = dead_mask[srcs_idx]
        src_fresh = ~history[srcs]
        for j in alive_rcv.tolist():
            t_pub = work[j]
            deadline = t_pub + p.collect_timeout
            col = seen_at[:, j].copy()
            col[srcs_idx == j] = np.inf  # its own
            # cutoff: quorum of last round's announcers seen (estimated from the sample), or the deadline
            need = p.quorum * min(prev_announcers, n) * len(srcs) / n
            order = np.sort(col[np.isfinite(col)])
            t_q = order[int(np.ceil(need)) - 1] if need >= 1 and len(order) >= np.ceil(need) else np.inf
            cutoff = min(max(t_pub, t_q), deadline - p.pull_reserve_s)
            seen = np.flatnonzero(col <= cutoff)
            live_src = np.count_nonzero(~src_dead & (srcs_idx != j))
            if live_src and np.count_nonzero(~src_dead[seen]) >= 0.99 * live_src:
                view_full += 1
            # K draws, history first: at most fresh_share of K from fresh identities
            good = seen[~src_fresh[seen]]
            fresh = seen[src_fresh[seen]]
            k_fresh = min(len(fresh), int(p.fresh_share * p.sample_peers))
            pool = list(rng.permutation(fresh)[:k_fresh]) + list(rng.permutation(good))
            head = pool[:p.sample_peers]
            rng.shuffle(head)  # fresh and proven peers mixed in the first K draws; replacements are proven ones
            pool[:p.sample_peers] = head
            want = min(p.sample_peers, np.count_nonzero(~src_dead & (srcs_idx != j)) * n // max(1, len(srcs)))
            t, got, chosen = cutoff, 0, []
            took = pull_time(p, rng, len(pool)) / 4  # pulls run 4 at a time: a quarter of each on the critical path
            for s, dt in zip(pool, took.tolist()):
                if got >= p.sample_peers or t >= deadline:
                    break
                if src_dead[s]:
                    t += p.dead_pull_s
                    continue
                t += dt
                if t <= deadline:
                    got += 1
                    chosen.append(s)
            wanted_total += want
            got_total += min(got, want)
            collect_s.append(t - t_pub)
            for s in chosen:
                history[srcs[s]] = True
        # Pull load with the real population (the sampled sources only estimate delivery): each live peer draws
        # K others uniformly (with replacement: a repeat has probability ~K^2/2N, negligible at these sizes)
        live = alive[~dead_mask]
        m = live.size
        idx = (np.arange(m)[:, None] + rng.integers(1, m, size=(m, p.sample_peers))) % m  # never oneself
        np.add.at(served, live[idx.ravel()], 1)
        if newcomers.size:
            history[newcomers[served[newcomers] > 0]] = True
        new_ok = bool(history[newcomers].all()) if newcomers.size else True
        # topic traffic per live peer: announce + re-publish + member heartbeats + clock, sent to deg-1 mesh peers
        deg = np.zeros(n_ids, dtype=int)
        for a, b in edges:
            deg[a] += 1
            deg[b] += 1
        round_s = float(np.median(work)) + float(np.median(collect_s))
        announces, beats = topic_cadence(p, round_s)
        topic_msgs = n * (announces + beats) + 1
        topic_bytes = n * (announces * (p.announce_bytes + PUBSUB_FRAME_BYTES) + beats * (p.heartbeat_bytes + PUBSUB_FRAME_BYTES))
        ids_window = min(MAX_IHAVE, topic_msgs / round_s * p.heartbeat_s * p.history_gossip)
        ihave_msgs = p.Dlazy * round_s / p.heartbeat_s
        ihave_bytes = ihave_msgs * (ids_window * MSG_ID_BYTES + 50)
        dl = deg[live]
        fwd = np.maximum(dl - 1, 0)
        msgs = topic_msgs * fwd + ihave_msgs + 2 * p.sample_peers + 2 * served[live]  # + pulls in and served
        bytes_out = (topic_bytes * fwd + ihave_bytes + p.sample_peers * 100 + served[live] * payload) * overhead
        bytes_in = (topic_bytes * dl + ihave_bytes + p.sample_peers * payload + served[live] * 100) * overhead
        busiest = int(np.argmax(bytes_out))
        deg_now = np.zeros(n_ids, dtype=int)  # the mesh this round's messages travelled on
        for a, b in damaged:
            deg_now[a] += 1
            deg_now[b] += 1
        row = {
            "round": r, "peers_live": int(m), "died": int(dead_now.size), "joined": int(newcomers.size) if r == p.churn_round + 1 else 0,
            "wanted_fraction_met": round(got_total / max(1, wanted_total), 5),
            "views_with_99pct_of_announcers_at_cutoff": round(view_full / max(1, len(alive_rcv)), 4),
            "announcements_reaching_all_by_round_end": round(float(np.mean(np.isfinite(arr[:, live]).all(axis=1))), 4),
            "mesh_below_Dlo": int(np.count_nonzero(deg_now[live] < p.Dlo)),
            "newcomers_with_history": new_ok,
            "collect_s": {"p50": round(float(np.median(collect_s)), 3), "p95": round(float(np.percentile(collect_s, 95)), 3)},
            "announce_reach_s": {"p50": round(float(np.median(arr[:, live][np.isfinite(arr[:, live])])), 4),
                                 "p99": round(float(np.percentile(arr[:, live][np.isfinite(arr[:, live])], 99)), 4),
                                 "never": round(float(np.mean(~np.isfinite(arr[:, live]))), 6)},
            "per_peer_per_round": {
                "messages_sent": {"mean": round(float(msgs.mean())), "max": round(float(msgs.max()))},
                "bytes_sent": {"mean": round(float(bytes_out.mean())), "max": round(float(bytes_out.max()))},
                "bytes_received": {"mean": round(float(bytes_in.mean())), "max": round(float(bytes_in.max()))},
                "of_which_topic_bytes_sent_mean": round(float((topic_bytes * fwd + ihave_bytes).mean() * overhead)),
                "of_which_payload_bytes_received_mean": round(p.sample_peers * payload * overhead),
            },
            "busiest_peer": {"pulls_served": int(served[live].max()), "pulls_served_p50": float(np.median(served[live])),
                             "mesh_degree": int(dl[busiest]), "bytes_sent": round(float(bytes_out[busiest]))},
            "mesh_degree": {"min": int(dl.min()), "p50": float(np.median(dl)), "max": int(dl.max())},
            "sim_wall_s": round(time.time() - t0, 2),
        }
        per_round.append(row)
        # the next round: the dead are gone, newcomers join with a repaired mesh
        prev_announcers = m
        if dead_now.size:
            k = dead_now.size
            newcomers = np.arange(next_id, next_id + k)
            next_id += k
            alive = np.concatenate([alive[~dead_mask], newcomers])
            edges = repair(edges, alive[: alive.size - k], p.D, p.Dlo, rng)
            new_edges = mesh(np.concatenate([newcomers, rng.choice(alive[: alive.size - k], size=k * p.D // 2)]), 1, rng)
            edges = repair(edges | {e for e in new_edges if e[0] != e[1]}, alive, p.D, p.Dlo, rng)
    converged = None
    for row in per_round[p.churn_round:]:
        if (row["wanted_fraction_met"] >= 0.99 and row["announcements_reaching_all_by_round_end"] >= 0.99
                and row["newcomers_with_history"] and row["mesh_below_Dlo"] == 0 and row["round"] > p.churn_round):
            converged = row["round"] - p.churn_round
            break
    steady = [r for r in per_round if r["round"] < p.churn_round] or per_round
    return {
        "label": "SIMULATION (simulated time; not a measurement)",
        "params": {k: v for k, v in asdict(p).items() if k != "calibration"},
        "steady_state": {
            "wanted_fraction_met": min(r["wanted_fraction_met"] for r in steady),
            "per_peer_per_round": steady[-1]["per_peer_per_round"], "busiest_peer": steady[-1]["busiest_peer"],
            "announce_reach_s": steady[-1]["announce_reach_s"], "collect_s": steady[-1]["collect_s"]},
        "churn": {"round": p.churn_round, "fraction": p.churn,
                  "wanted_fraction_met_at_churn": per_round[p.churn_round]["wanted_fraction_met"] if p.churn_round < p.rounds else None,
                  "rounds_to_converge": converged},
        "rounds": per_round,
    }


def code_revision() -> str:
    """This tree's revision: the model's version (it runs none of p2pswarm's code)."""
    import subprocess

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "bench/sim_gossip.py"],
                           capture_output=True, text=True).stdout.strip()
    return rev + ("-dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="*", help="swarm sizes (default 1000 10000; quick 1000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=Params.rounds)
    ap.add_argument("--sample-peers", type=int, default=Params.sample_peers, help="K")
    ap.add_argument("--sources", type=int, default=Params.sources, help="publishers whose spread is computed per round")
    ap.add_argument("--scenarios", nargs="*", default=None,
                    help="loopback (the calibration as measured) and/or wan (+40 ms a hop, 12.5 MB/s a peer: an assumption)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-s", type=float, default=Params.work_s, help="seconds from round start to publish (10: a ~14 s round, as in bench/swarm_exchange.py's simulations)")
    ap.add_argument("--cadence", choices=("new", "old"), default="new", help="whose topic cadence: this code's or the one before issue #13's traffic work")
    ap.add_argument("--shard-size", type=int, default=0, metavar="N",
                    help="topic shards of at most N peers, as the keeper splits them (gossip.shards_for): one shard "
                         "is simulated, since shards share nothing but the keeper and the base topic's clock")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = args.peers or ([1000] if args.quick else [1000, 10000])
    scenarios = args.scenarios or (["loopback"] if args.quick else ["loopback", "wan"])
    out = args.out or RESULTS / ("sim_gossip.quick.json" if args.quick else "sim_gossip.json")
    cal = calibrate([RESULTS / "swarm_exchange.json", RESULTS / "swarm_exchange.quick.json"])
    t_begin = time.time()
    load0 = os.getloadavg()
    result = {"benchmark": "sim_gossip", "label": "SIMULATION (simulated time; calibrated on real runs, not measured)",
              "command": "python " + " ".join(["bench/sim_gossip.py", *os.sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "calibration": cal, "code": code_revision(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": [round(x, 1) for x in load0]},
              "runs": []}
    for sc in scenarios:
        extra = {"loopback": {}, "wan": {"link_ms": 40.0, "bandwidth_mb_s": 12.5}}[sc]
        for n in sizes:
            t0, c0 = time.time(), time.process_time()
            sizes_of = {"old": {"announce_bytes": 101, "heartbeat_bytes": 92}, "new": {}}[args.cadence]
            shards = 1
            if args.shard_size:
                import sys

                sys.path.insert(0, str(ROOT))
                from p2pswarm.comm.hivemind.gossip import shards_for

                shards = shards_for(n, args.shard_size)
            p = Params(peers=-(-n // shards), rounds=args.rounds, sample_peers=args.sample_peers, sources=args.sources, seed=args.seed,
                       calibration=cal, cadence=args.cadence, work_s=args.work_s, **sizes_of, **extra)
            res = simulate(p) | {"scenario": sc, "peers": n, "shards": shards, "peers_per_shard": p.peers,
                                 "wall_s": round(time.time() - t0, 1),
                                 "cpu_s": round(time.process_time() - c0, 1)}  # wall time moves with the machine's load
            result["runs"].append(res)
            s, c = res["steady_state"], res["churn"]
            pp = s["per_peer_per_round"]
            if shards > 1:  # the keeper is in every shard's mesh: about S times a member's topic bytes (each way)
                res["keeper_topic_bytes_per_round_estimate"] = round(shards * pp["of_which_topic_bytes_sent_mean"])
            print(f"[{sc}] {n} peers in {shards} shard(s) of {p.peers} (K={p.sample_peers}, D={p.D}): wanted met {s['wanted_fraction_met']}, per peer/round "
                  f"{pp['messages_sent']['mean']} msgs, {pp['bytes_sent']['mean'] / 1e6:.2f} MB out "
                  f"(topic {pp['of_which_topic_bytes_sent_mean'] / 1e6:.2f} MB), {pp['bytes_received']['mean'] / 1e6:.2f} MB in; "
                  f"busiest serves {s['busiest_peer']['pulls_served']} pulls; reach p99 {s['announce_reach_s']['p99']} s; "
                  f"churn {c['fraction']:.0%}: wanted met {c['wanted_fraction_met_at_churn']} that round, converged in "
                  f"{c['rounds_to_converge']} round(s) [{res['cpu_s']} s CPU, {res['wall_s']} s wall]", flush=True)
    result["machine"]["loadavg_end"] = [round(x, 1) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - t_begin, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {result['wall_s']} s")


if __name__ == "__main__":
    main()

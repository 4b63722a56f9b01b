"""Swarm exchange over hivemind on 127.0.0.1: publish-to-delivery latency, delivery, bytes, start-up, memory.

    python bench/swarm_exchange.py                       # N = 2, 4, 8 peers + simulations of 8, 32, 64 (~10 min)
    python bench/swarm_exchange.py --quick               # N = 4 + simulations of 8, 16 (~3 min)
    python bench/swarm_exchange.py --ref bdf3333         # the same on revision bdf3333 first, then on this tree

One bootstrap peer (`python -m bootstrap`) and N peer processes, no model. Every round each peer calls
`HivemindComm.publish(r, 0, groups)` then `HivemindComm.collect(r, 0)`, exactly as the trainer does
(p2pswarm/game.py), with synthetic rollouts encoded by p2pswarm.wire: "30KB" = 8 groups x 4 completions of
~200 tokens (800 characters), "1MB" = 32 groups x 8 completions of ~1000 tokens. Rounds start on a shared
wall-clock schedule (all processes share this machine's clock), so publish and delivery times compare
directly. After each payload size, a raw floor on the same bytes between ring neighbours: a plain
`DHTNode.store` + `DHTNode.get` of the payload, and one raw stream pull (payloads.pull) with no DHT and no
checks. The simulation runs many peers several to a process (each its own HivemindNode with its own p2pd).

Side by side (--ref REF, repeatable): REF is exported with `git archive` into the work directory and its
peers and bootstrap run with PYTHONPATH set to it; this file's own measurement code drives both, and every
hook into the code under test is optional (what a revision lacks is left unmeasured, not failed). Each run
records its transport, read from the daemon the code started (`gossip` when p2pd runs with -pubsub, else
`dht`), and each peer's messages and bytes per round: the kernel's tcp_info counters of the sockets of that
peer's p2pd (SocketMeter), i.e. everything the peer's daemon sent and received over TCP (DHT, pubsub, pulls,
their libp2p framing), not what Python asked for. The "runs" list in the JSON has one compact row per
(code, N, payload or variant).

Writes bench/results/swarm_exchange.json and bench/results/swarm_exchange.png (overwritten each full run;
--quick writes swarm_exchange.quick.json/.png). Every process started here is killed by process group at the
end, whatever happens.
"""

from __future__ import annotations

import time

_T_MAIN = time.time()  # before any heavy import: the worker's "interpreter up" moment

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import zlib  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SWARM = "bench-exchange"

# name: (groups, completions per group, characters per completion)  ~4 characters a token
SIZES = {"30KB": (8, 4, 800), "1MB": (32, 8, 3900)}


# ---- small helpers shared by both sides ------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def smaps(pid: int) -> dict[str, int]:
    """Rss / Pss / Anonymous of a process in kB (from /proc/<pid>/smaps_rollup)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Anonymous"):
                out[k.lower()] = int(v.split()[0])
    except OSError:
        pass
    return out


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds of these Python processes and of their p2pd children, apart."""
    py = sum(cpu_s(p) for p in pids)
    kids = sum(cpu_s(c) for p in pids for c in children(p))
    return {"python": py, "p2pd": kids}


def lo_bytes() -> int:
    """Bytes sent over the loopback interface so far (machine-wide)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])  # transmit bytes (on lo every byte sent is also received)
    return 0


def text(rng: random.Random, n: int) -> str:
    words = ["the", "answer", "is", "so", "we", "add", "then", "multiply", "by", "<think>", "</think>", "because",
             "first", "step", "value", "equals", "therefore", "<answer>", "</answer>", "check", "sum", "of"]
    out, size = [], 0
    while size < n:
        w = rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 9999))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def make_groups(label: str, peer: str, seed: int):
    from p2pswarm.types import Group, Task

    n_groups, g, chars = SIZES[label]
    rng = random.Random(seed)
    groups = []
    for i in range(n_groups):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        task = Task(f"arith-{seed}-{i}", "basic_arithmetic", f"What is {a} + {b}? Think step by step.", str(a + b),
                    {"source_index": i})
        groups.append(Group(task, [text(rng, chars) for _ in range(g)], peer, [float(rng.random() < 0.5) for _ in range(g)]))
    return groups


# ---- the worker: one process, one or several peers --------------------------------------------------------
def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    d = Path(spec["dir"])
    try:  # die with the orchestrator, however it dies
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    t_imp0 = time.time()
    from p2pswarm import wire
    from p2pswarm.comm.hivemind import records
    from p2pswarm.comm.hivemind.manager import HivemindComm
    from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig
    from p2pswarm.comm.hivemind.payloads import pull
    from p2pswarm.identity import Identity

    import importlib.util

    GOSSIP = importlib.util.find_spec("p2pswarm.comm.hivemind.gossip") is not None  # announcements on a topic
    t_imp1 = time.time()
    # The code under test may be another revision (--ref): every hook below is optional, and what a revision
    # lacks is left unmeasured rather than failing the run.
    for hook in (cache_record_validation, admit_raw_floor_records):
        try:
            hook()
        except (ImportError, AttributeError) as e:
            print(f"bench hook {hook.__name__} not installed on this code: {e}", flush=True)
    timed_fetch = _has_params(getattr(HivemindComm, "_fetch", None), ["self", "a", "round", "stage", "deadline"])
    timed_members = _has_params(getattr(HivemindComm, "fetch_members", None), ["self"])

    class TimedComm(HivemindComm):
        """HivemindComm unchanged, plus when each announcement was first seen (where the code has the old
        `_fetch`) and each batch was in hand (every accepted batch goes through SignedTransport.accept)."""

        def __init__(self, *a, **kw):
            self.seen_at: dict = {}
            self.arrived_at: dict = {}
            self.polls = 0
            super().__init__(*a, **kw)

        def accept(self, data, *a, **kw):
            batch = super().accept(data, *a, **kw)
            if batch is not None:
                self.arrived_at.setdefault((batch.round, batch.stage, batch.peer), time.time())
            return batch

        if timed_members:
            async def fetch_members(self):
                self.polls += 1
                return await super().fetch_members()

        if timed_fetch:
            async def _fetch(self, a, round, stage, deadline):
                self.seen_at.setdefault((round, stage, a.peer_id), time.time())
                return await super()._fetch(a, round, stage, deadline)

    import inspect

    accepted = set(inspect.signature(HivemindComm.__init__).parameters)
    comm_kw = {k: v for k, v in {"timeout": spec["timeout"], "want_peers": spec["want_peers"], **spec.get("comm_args", {})}.items()
               if k in accepted}
    peers = []  # [(name, node, comm, startup)]
    try:
        for name in spec["names"]:
            t0 = time.time()
            ident = Identity.load_or_create(d / f"{name}.key")
            node = HivemindNode(ident, d / f"{name}.key", NetConfig(initial_peers=[spec["boot"]], host="127.0.0.1"))
            kids = set(children(os.getpid()))
            node.start()
            p2pd = sorted(set(children(os.getpid())) - kids)  # this peer's daemon: the orchestrator meters its sockets
            t1 = time.time()
            # first contact, on the DHT transport: the member list (with the bootstrap in it); the gossip transport
            # has none in the DHT (its join asks the initial peers over the catch-up stream instead)
            while not GOSSIP and hasattr(records, "members_key"):
                got = node.call(node.dht.get(records.members_key(SWARM), latest=True), timeout=30)
                if got is not None and isinstance(got.value, dict) and got.value:
                    break
                time.sleep(0.05)
            t2 = time.time()
            comm = TimedComm(node, SWARM, name=name, **comm_kw)
            for _ in range(600):  # gossip: until the topic (or the join's catch-up) has shown another member
                if not GOSSIP or len(node.call(comm.fetch_members(), timeout=30)) > 1:
                    break
                time.sleep(0.05)
            t3 = time.time()
            startup = {"launch": spec["t_launch"], "interpreter_s": _T_MAIN - spec["t_launch"], "import_s": t_imp1 - t_imp0,
                       "node_start_s": t1 - t0, "first_contact_s": t2 - t1, "join_s": t3 - t2,
                       "to_first_contact_s": t2 - spec["t_launch"], "to_ready_s": t3 - spec["t_launch"],
                       "peers_in_process_before": len(peers)}
            peers.append((name, node, comm, startup))
            Path(d / f"{name}.ready.json").write_text(json.dumps({
                "peer_id": ident.peer_id, "startup": startup, "transport": transport_of(os.getpid()), "p2pd_pids": p2pd,
                "comm_settings": {k: getattr(comm, k) for k in ("timeout", "want_peers", "sample_peers") if hasattr(comm, k)},
                "imported": sys.modules["p2pswarm"].__file__}))  # proof of which tree the peer ran
        mem_idle = memory(os.getpid())

        go = d / "go.json"
        boot_id = spec["boot"].rsplit("/p2p/", 1)[-1]

        def follow_shards(comm) -> None:  # as the round clock does: the topic shards the keeper says
            if spec.get("shard_size") and hasattr(comm, "follow_shards"):
                comm.follow_shards(comm.book.clock_shards({boot_id}))

        while not go.exists():
            for _, _, comm, _ in peers:
                follow_shards(comm)
            time.sleep(0.5)
        time.sleep(0.05)
        plan = json.loads(go.read_text())
        ids = plan["peer_ids"]

        def run_peer(i: int, out: dict) -> None:
            try:
                _run_peer(i, out)
            finally:
                for ev in phase_done[i]:  # also when it failed: the main thread waits on these
                    ev.set()

        def _run_peer(i: int, out: dict) -> None:
            name, node, comm, _ = peers[i]
            order = sorted(ids.values())
            rounds, raws, skipped = [], [], []
            out["rounds"], out["raw"], out["skipped"] = rounds, raws, skipped
            for j, ph in enumerate(plan["phases"]):
                if j > 0:
                    phase_done[i][j - 1].set()
                if ph["kind"] == "rounds":
                    groups = make_groups(ph["size"], comm.peer_id, seed=zlib.crc32(f"{name}/{ph['size']}".encode()))
                    comm.want_peers = ph.get("want_peers", spec["want_peers"])
                    VALIDATION_CACHE["on"] = ph.get("cache", False)
                    topic0 = topic_counts(comm)
                    for k in range(ph["rounds"]):
                        r = ph["first_round"] + k
                        wait_until(ph["t0"] + k * ph["period"])
                        late = time.time() - (ph["t0"] + k * ph["period"])
                        if late > ph["period"] / 2:  # the last round overran this one's slot: skip it, as a peer
                            skipped.append({"round": r, "phase": ph["label"], "late_s": late})  # behind the clock does
                            continue
                        follow_shards(comm)
                        drops0 = Counter(getattr(getattr(comm, "inbox", None), "drops", {}))
                        tp0 = time.time()
                        error = None
                        try:
                            comm.publish(r, 0, groups)
                        except Exception as e:  # noqa: BLE001 - the trainer's round would die here; we record it
                            error = f"publish: {type(e).__name__}"
                        tp1 = time.time()
                        polls0 = comm.polls
                        try:
                            swarm = comm.collect(r, 0)
                        except Exception as e:  # noqa: BLE001
                            error, swarm = f"collect: {type(e).__name__}", []
                        tc1 = time.time()
                        for g in swarm:  # a batch the hook did not see (another code path): in hand by the end
                            comm.arrived_at.setdefault((r, 0, g.peer), tc1)
                        rounds.append({"round": r, "size": ph["size"], "phase": ph["label"], "late_s": late, "publish_start": tp0, "publish_s": tp1 - tp0,
                                       "collect_s": tc1 - tp1, "collect_end": tc1, "polls": comm.polls - polls0,
                                       "error": error, "live": len(comm.live_peers()),
                                       "drops": dict(Counter(getattr(getattr(comm, "inbox", None), "drops", {})) - drops0),
                                       "groups": len(swarm), "bytes": len(served(comm, r)),
                                       "seen": {ids_rev[p]: t for (rr, _, p), t in comm.seen_at.items() if rr == r and p in ids_rev},
                                       "arrived": {ids_rev[p]: t for (rr, _, p), t in comm.arrived_at.items() if rr == r and p in ids_rev}})
                    topic1 = topic_counts(comm)  # the topic's own messages over the phase (not TCP segments)
                    out.setdefault("topic", {})[ph["label"]] = {k: topic1[k] - topic0[k] for k in topic1}
                elif ph["kind"] == "raw":  # the floor: the same bytes through the DHT, and one raw stream pull
                    me = order.index(comm.peer_id)
                    nb = order[(me + 1) % len(order)]
                    data = served(comm, ph["round"])
                    if not data:  # this peer skipped that round: serve one of the same size now
                        data = wire.encode(wire.RolloutBatch(SWARM, ph["round"], 0, comm.peer_id, make_groups(
                            ph["size"], comm.peer_id, seed=zlib.crc32(f"{name}/{ph['size']}".encode()))), comm.identity)
                        try:
                            comm.server.put(ph["round"], 0, data)
                        except Exception:  # noqa: BLE001 - another revision's payload store: the pull floor fails
                            pass
                    for k in range(ph["reps"]):
                        base = ph["t0"] + k * ph["period"]
                        key = f"bench/raw/{ph['size']}/{k}"
                        wait_until(base)
                        ts0 = time.time()
                        try:
                            ok = node.call(node.dht.store(f"{key}/{comm.peer_id}", data, get_dht_time() + 60), timeout=60)
                        except Exception:  # noqa: BLE001
                            ok = False
                        store_s = time.time() - ts0
                        wait_until(base + ph["gap"])
                        tg0 = time.time()
                        try:
                            got = node.call(node.dht.get(f"{key}/{nb}", latest=True), timeout=60)
                        except Exception:  # noqa: BLE001
                            got = None
                        get_s = time.time() - tg0
                        got_ok = got is not None and isinstance(got.value, bytes) and abs(len(got.value) - len(data)) < len(data) // 10
                        wait_until(base + 2 * ph["gap"])
                        tq0 = time.time()
                        try:
                            pulled = node.call(pull(node.p2p, nb, ph["round"], 0, max_bytes=8 << 20, timeout=30), timeout=40)
                            pull_ok = abs(len(pulled) - len(data)) < len(data) // 10  # the neighbour's batch of this size
                        except Exception:  # noqa: BLE001
                            pull_ok = False
                        pull_s = time.time() - tq0
                        raws.append({"size": ph["size"], "bytes": len(data), "stored": bool(ok), "store_s": store_s,
                                     "get_ok": got_ok, "get_s": get_s, "pull_ok": pull_ok, "pull_s": pull_s})
            out["counters"] = {k: v for k, v in comm.counters().items() if k != "per_peer"}

        from hivemind.utils import get_dht_time

        ids_rev = {v: k for k, v in ids.items()}
        outs = [{} for _ in peers]
        phase_done = [[threading.Event() for _ in plan["phases"]] for _ in peers]
        threads = [threading.Thread(target=run_peer, args=(i, outs[i]), daemon=True) for i in range(len(peers))]
        for t in threads:
            t.start()
        # CPU of this process and its p2pd children, and loopback bytes, over each rounds phase: from its start
        # until its planned end and every peer here finished it (rounds can overrun their slots)
        usage = {}
        for j, ph in enumerate(plan["phases"]):
            if ph["kind"] != "rounds":
                continue
            wait_until(ph["t0"] - 0.02)
            c0, l0, w0 = tree_cpu([os.getpid()]), lo_bytes(), time.time()
            wait_until(ph["t0"] + ph["rounds"] * ph["period"] - 0.05)
            for ev in phase_done:
                ev[j].wait()
            c1, l1 = tree_cpu([os.getpid()]), lo_bytes()
            usage[ph["label"]] = {"python_cpu_s": c1["python"] - c0["python"], "p2pd_cpu_s": c1["p2pd"] - c0["p2pd"],
                                 "lo_bytes": l1 - l0, "wall_s": time.time() - w0}
        for t in threads:
            t.join()
        mem_busy = memory(os.getpid())
        for (name, _, _, startup), out in zip(peers, outs):
            out.update(name=name, startup=startup, peers_in_process=len(peers), mem_idle=mem_idle, mem_after=mem_busy,
                       usage=usage)
            Path(d / f"{name}.result.json").write_text(json.dumps(out))
    finally:
        for name, node, comm, _ in peers:
            t = time.time()
            try:
                comm.close()
            except Exception:  # noqa: BLE001
                node.close()
            print(f"{name}: closed in {time.time() - t:.2f} s", flush=True)


TOPIC_COUNTERS = ("gossip_sent", "gossip_received", "gossip_bytes_sent", "gossip_bytes_in", "catchups")


def topic_counts(comm) -> dict[str, int]:
    try:
        c = comm.counters()
    except Exception:  # noqa: BLE001 - another revision's counters
        return {k: 0 for k in TOPIC_COUNTERS}
    return {k: int(c.get(k, 0) or 0) for k in TOPIC_COUNTERS}


def _has_params(fn, names: list[str]) -> bool:
    import inspect

    try:
        return fn is not None and list(inspect.signature(fn).parameters) == names
    except (TypeError, ValueError):
        return False


def served(comm, round: int) -> bytes:
    """This peer's own signed batch of (round, stage 0), or b"" where the code keeps it elsewhere."""
    try:
        return comm.server.get(round, 0) or b""
    except Exception:  # noqa: BLE001 - another revision's payload store
        return b""


def transport_of(pid: int) -> dict:
    """Which exchange the code under test runs, read from the p2pd it started rather than from its source:
    'gossip' when the daemon runs with pubsub on (`-pubsub=1`/`-pubsub=true`), else 'dht'."""
    args = []
    for c in children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"p2pd"):
            args = [a.decode(errors="replace") for a in cmd[1:] if a]
    pubsub = any(re.fullmatch(r"-+pubsub(=(1|true|True))?", a) for a in args)
    return {"transport": "gossip" if pubsub else "dht", "p2pd_flags": sorted(a.split("=")[0] for a in args)}


VALIDATION_CACHE = {"on": False}


def cache_record_validation() -> None:
    """A bench-only experiment, NOT what p2pswarm does: remember each node's verdict on a DHT record (by its exact
    key, subkey, signed value and expiry), so the same signed record returned by every replica on every poll is
    verified once. Measures what such a cache in Ed25519OwnerValidator.validate would save."""
    from collections import OrderedDict

    from p2pswarm.comm.hivemind.records import Ed25519OwnerValidator

    original = Ed25519OwnerValidator.validate

    def validate(self, record) -> bool:
        if not VALIDATION_CACHE["on"]:
            return original(self, record)
        cache = self.__dict__.setdefault("_bench_cache", OrderedDict())  # one per node, as it would be for real
        k = (record.key, record.subkey, record.value, record.expiration_time)
        verdict = cache.get(k)
        if verdict is None:
            verdict = cache[k] = original(self, record)
            if len(cache) > 8192:
                cache.popitem(last=False)
        return verdict

    Ed25519OwnerValidator.validate = validate


def admit_raw_floor_records() -> None:
    """The "raw" phase stores plain values (no owner, no record kind) to measure the DHT's own floor; the swarm's
    validator refuses those, so the bench's workers admit them (the bootstrap, a real `python -m bootstrap`, does
    not: those values are replicated on workers only)."""
    from hivemind.dht.protocol import DHTProtocol

    from p2pswarm.comm.hivemind.records import Ed25519OwnerValidator

    original = Ed25519OwnerValidator.check

    def check(self, record, now=None):
        if record.subkey == DHTProtocol.IS_REGULAR_VALUE:
            return None, None
        return original(self, record, now)

    Ed25519OwnerValidator.check = check


def wait_until_text(path: Path, pattern: str, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, path.read_text(errors="replace") if path.exists() else ""):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what}: no {pattern!r} in {path} after {timeout:.0f} s")


def wait_until(t: float) -> None:
    dt = t - time.time()
    if dt > 0:
        time.sleep(dt)


def memory(pid: int) -> dict:
    """RSS/PSS in MB of the Python process and of its p2pd children (all of them, in total)."""
    py = smaps(pid)
    kids = [smaps(c) for c in children(pid)]
    return {"python_rss_mb": py.get("rss", 0) / 1024, "python_pss_mb": py.get("pss", 0) / 1024,
            "python_anon_mb": py.get("anonymous", 0) / 1024, "p2pd_count": len(kids),
            "p2pd_rss_mb": sum(k.get("rss", 0) for k in kids) / 1024, "p2pd_pss_mb": sum(k.get("pss", 0) for k in kids) / 1024}


# ---- the orchestrator -------------------------------------------------------------------------------------
class Swarm:
    """A bootstrap peer and worker processes, each in its own session; killed by process group in close()."""

    def __init__(self, workdir: Path, code: Path = ROOT):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.boot_stop_s = self.workers_left_s = None
        # `code`: the project tree whose p2pswarm and bootstrap the peers import (this one, or a --ref export)
        self.env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _popen(self, cmd: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=open(self.dir / log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=self.env, cwd=self.dir)
        self.procs.append(p)
        return p

    def start_bootstrap(self, timeout: float = 90) -> str:
        cmd = os.environ.get("SWARM_EXCHANGE_BOOT_CMD")  # debugging only: a replacement bootstrap command line
        self.boot = self._popen(cmd.split() if cmd else [
            sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity", "boot.key",
            "--experiment", SWARM, "--status-every", "3600",
            *(["--coordinator", "--shard-size", str(self.shard_size)] if getattr(self, "shard_size", 0) else [])], "boot.log")
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", (self.dir / "boot.log").read_text(errors="replace"), re.M)
            if m:
                return m.group(1)
            if self.boot.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("bootstrap did not start:\n" + (self.dir / "boot.log").read_text(errors="replace")[-2000:])

    def start_worker(self, names: list[str], boot: str, timeout: float, want_peers: int) -> subprocess.Popen:
        spec = self.dir / f"{names[0]}.spec.json"
        spec.write_text(json.dumps({"dir": str(self.dir), "names": names, "boot": boot, "timeout": timeout,
                                    "want_peers": want_peers, "t_launch": time.time(),
                                    "comm_args": getattr(self, "comm_args", {}),
                                    "shard_size": getattr(self, "shard_size", 0)}))
        return self._popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)], f"{names[0]}.log")

    def wait_files(self, names: list[str], suffix: str, timeout: float) -> dict[str, dict]:
        deadline = time.time() + timeout
        out: dict[str, dict] = {}
        while time.time() < deadline:
            for n in names:
                f = self.dir / f"{n}.{suffix}.json"
                if n not in out and f.exists():
                    try:
                        out[n] = json.loads(f.read_text())
                    except json.JSONDecodeError:
                        pass  # being written
            if len(out) == len(names):
                return out
            dead = [p for p in self.procs if p.poll() is not None and p is not self.boot]
            if dead and suffix == "ready":
                logs = {Path(p.args[-1]).name: p.returncode for p in dead}
                raise RuntimeError(f"worker(s) exited before ready: {logs}; see {self.dir}")
            time.sleep(0.1)
        missing = sorted(set(names) - set(out))
        raise RuntimeError(f"no {suffix} file from {missing[:5]} within {timeout:.0f} s; see {self.dir}")

    def boot_memory(self) -> dict:
        return memory(self.boot.pid)

    def close(self, grace: float = 20.0) -> None:
        """Workers leave on their own once they wrote their results (given `grace` seconds), then the bootstrap
        gets SIGTERM; whatever is left is SIGKILLed by process group."""
        deadline = time.time() + grace
        for p in self.procs[1:]:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        self.workers_left_s = time.time() - (deadline - grace)
        for p in self.procs[1:]:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.procs and self.procs[0].poll() is None:  # the bootstrap: SIGTERM to its PID, as an operator would
            self.procs[0].send_signal(signal.SIGTERM)  # (not its group: p2pd would die first, see the README)
        t_term = time.time()
        for p in self.procs:
            try:
                p.wait(timeout=20)
                if p is self.procs[0]:
                    self.boot_stop_s = time.time() - t_term
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for p in self.procs:  # p2pd shares its Python's process group; make sure none of the group is left
            if group_members(p.pid):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


class SocketMeter:
    """TCP traffic of chosen processes (each peer's p2pd), sampled from the kernel's per-socket tcp_info.

    Every `every` seconds a thread reads `ss -tinHe` (all TCP sockets with their inode and counters) and keeps,
    per socket of a watched process, the last bytes_acked (sent), bytes_received and data_segs_out/in seen.
    `between(pid, t0, t1, limit)` is what the process's sockets sent/received in that window, widened to the
    samples around it: a socket open before t0 counts from its last sample at or before t0, one opened later
    counts in full, and the first sample after t1 closes the window, unless it is past `limit` (the next
    phase's start), where the last sample before `limit` does. What a socket opened and
    closed between two samples carried is missed (libp2p keeps one connection per peer pair, so few are).
    "Messages" are data-carrying TCP segments: on loopback one segment holds up to 64 KB, so a small RPC or
    pubsub message is one segment and a 1 MB payload about 16."""

    def __init__(self, every: float = 0.5):
        self.every = every
        self.pids: set[int] = set()
        self.samples: list[tuple[float, dict[int, dict[int, tuple[int, int, int, int]]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("ss") is not None

    def watch(self, pids) -> None:
        self.pids.update(pids)

    def start(self) -> "SocketMeter":
        if self.available:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.sample()))
            except Exception as e:  # noqa: BLE001 - a missed sample only widens the window
                print(f"socket meter: {type(e).__name__}: {e}", flush=True)
            self._stop.wait(self.every)

    def sample(self) -> dict[int, dict[int, tuple[int, int, int, int]]]:
        owner = {}
        for pid in list(self.pids):
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    try:
                        link = os.readlink(fd)
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        owner[int(link[8:-1])] = pid
            except OSError:
                continue
        out: dict[int, dict[int, tuple[int, int, int, int]]] = {}
        text_ = subprocess.run(["ss", "-tinHe"], capture_output=True, text=True, timeout=20).stdout
        ino = None
        for line in text_.splitlines():
            if not line.startswith(("\t", " ")):
                m = re.search(r"\bino:(\d+)", line)
                ino = int(m.group(1)) if m else None
                continue
            if ino not in owner:
                continue
            f = dict(re.findall(r"\b(bytes_acked|bytes_received|data_segs_out|data_segs_in):(\d+)", line))
            out.setdefault(owner[ino], {})[ino] = tuple(int(f.get(k, 0)) for k in
                                                         ("bytes_acked", "bytes_received", "data_segs_out", "data_segs_in"))
        return out

    def between(self, pid: int, t0: float, t1: float, limit: float | None = None) -> dict[str, int] | None:
        before = [s.get(pid, {}) for t, s in self.samples if t <= t0]
        # up to and including the first sample after t1 (what was sent just before t1 shows there), unless that
        # sample is past `limit` (the next phase's start: its traffic is not this one's)
        after = [i for i, (t, _) in enumerate(self.samples) if t > t1 and (limit is None or t <= limit)]
        upto = [i for i, (t, _) in enumerate(self.samples) if t <= (t1 if limit is None else limit)]
        last_i = after[0] if after else (upto[-1] if upto else len(self.samples) - 1)
        inside = [s.get(pid, {}) for t, s in self.samples[:last_i + 1] if t > t0]
        if not inside:
            return None
        base = before[-1] if before else {}
        last: dict[int, tuple[int, ...]] = {}
        for s in inside:
            last.update(s)
        tot = [0, 0, 0, 0]
        for ino, v in last.items():
            b = base.get(ino, (0, 0, 0, 0))
            for i in range(4):
                tot[i] += max(0, v[i] - b[i])
        return dict(zip(("bytes_sent", "bytes_received", "messages_sent", "messages_received"), tot))


def run_swarm(workdir: Path, n: int, per_proc: int, phases: list[dict], *, timeout: float, want_peers: int,
              staggered: bool, raw: dict | None, log=print, code: Path = ROOT, comm_args: dict | None = None,
              shard_size: int = 0) -> dict:
    """Start a bootstrap and n peers (per_proc to a process), run `phases`, return every peer's records and
    their p2pd's TCP traffic per rounds phase."""
    sw = Swarm(workdir, code)
    sw.comm_args = comm_args or {}
    sw.shard_size = shard_size
    load = [round(x, 1) for x in os.getloadavg()]  # others' work on this machine slows every timing here
    meter = SocketMeter()
    done = False
    try:
        boot = sw.start_bootstrap()
        names = [f"p{i:02d}" for i in range(n)]
        chunks = [names[i:i + per_proc] for i in range(0, n, per_proc)]
        t_start = time.time()
        ready: dict[str, dict] = {}
        for c in chunks:
            sw.start_worker(c, boot, timeout, want_peers)
            if staggered:  # one at a time: each start-up measured alone, joining a swarm of the ones before
                ready.update(sw.wait_files(c, "ready", 120))
        ready.update(sw.wait_files(names, "ready", 60 + 5 * n))
        all_up_s = time.time() - t_start
        log(f"  {n} peers up in {all_up_s:.1f} s ({len(chunks)} process(es))")
        shards = 1
        if shard_size:  # the keeper splits the topic as it counts the peers: rounds start once it has
            from p2pswarm.comm.hivemind.gossip import shards_for

            shards, t_shards = shards_for(n, shard_size), time.time()
            if shards > 1:
                wait_until_text(sw.dir / "boot.log", rf"to {shards} shard\(s\)", 180, "the keeper's shards")
                time.sleep(2.0)  # every worker follows within 0.5 s of hearing the clock
            log(f"  {shards} topic shard(s) of at most {shard_size} peers, after {time.time() - t_shards:.1f} s")
        # the schedule: rounds of each size on the wall clock, then the raw floor on the same bytes
        t = time.time() + 1.5
        plan, first_round, windows = [], 0, []
        for ph in phases:
            plan.append({**ph, "kind": "rounds", "label": ph.get("label", ph["size"]),
                         "t0": t, "first_round": first_round})
            windows.append((ph.get("label", ph["size"]), t, t + ph["rounds"] * ph["period"]))
            last = first_round + ph["rounds"] - 1
            t += ph["rounds"] * ph["period"] + ph.get("gap_after", 0.0)
            first_round += ph["rounds"]
            if raw:
                gap = raw["gap"][ph["size"]]
                plan.append({"kind": "raw", "size": ph["size"], "round": last, "reps": raw["reps"], "period": 3 * gap,
                             "gap": gap, "t0": t})
                t += raw["reps"] * 3 * gap
        peer_ids = {k: v["peer_id"] for k, v in ready.items()}
        meter.watch(pid for v in ready.values() for pid in v.get("p2pd_pids", []))
        meter.watch(children(sw.boot.pid))
        meter.start()
        (sw.dir / "go.json.tmp").write_text(json.dumps({"phases": plan, "peer_ids": peer_ids}))
        (sw.dir / "go.json.tmp").rename(sw.dir / "go.json")
        boot_cpu = {}
        for size, a, b in windows:  # the bootstrap's CPU over each size's planned rounds
            wait_until(a - 0.05)
            b0 = tree_cpu([sw.boot.pid])
            wait_until(b - 0.05)
            b1 = tree_cpu([sw.boot.pid])
            boot_cpu[size] = {"cpu_s": b1["python"] + b1["p2pd"] - b0["python"] - b0["p2pd"], "wall_s": b - a}
        boot_mem = sw.boot_memory()
        results = sw.wait_files(names, "result", max(0, t - time.time()) + 120 + 3 * n)
        time.sleep(2 * meter.every)  # a sample after the last collect
        meter.stop()
        done = True
        ret = {"n": n, "timeout": timeout, "shard_size": shard_size, "shards": shards, "per_process": per_proc, "all_up_s": all_up_s, "ready": ready, "results": results,
               "boot_cpu": boot_cpu, "boot_memory": boot_mem, "plan": plan,
               "loadavg": {"start": load, "end": [round(x, 1) for x in os.getloadavg()]},
               "traffic": traffic(meter, plan, ready, results, children(sw.boot.pid))}
    finally:
        meter.stop()
        sw.close(grace=20.0 if done else 0.0)
    ret["workers_exit_s"] = sw.workers_left_s  # from all results in to every worker process gone
    ret["bootstrap_sigterm_exit_s"] = sw.boot_stop_s
    return ret


def traffic(meter: SocketMeter, plan: list[dict], ready: dict, results: dict, boot_p2pd: list[int]) -> dict:
    """Per rounds phase: each peer's p2pd TCP traffic per round it played, from the phase's start to the end of
    its last collect (whoever ended last); the bootstrap's p2pd apart."""
    out = {}
    for j, ph in enumerate(plan):
        if ph["kind"] != "rounds":
            continue
        limit = plan[j + 1]["t0"] if j + 1 < len(plan) else None  # the raw floor or the next variant starts there
        label = ph["label"]
        rows = {nm: [r for r in v["rounds"] if r["phase"] == label] for nm, v in results.items()}
        ends = [r["collect_end"] for rs in rows.values() for r in rs]
        if not ends:
            continue
        t0, t1 = ph["t0"] - 0.05, max(ends) + 0.05
        per_peer = {}
        for nm, v in ready.items():
            played = len(rows.get(nm, []))
            got = [meter.between(pid, t0, t1, limit) for pid in v.get("p2pd_pids", [])]
            got = [g for g in got if g]
            if played and got:
                per_peer[nm] = {k: sum(g[k] for g in got) / played for k in got[0]}
        boot = [meter.between(pid, t0, t1, limit) for pid in boot_p2pd]
        boot = [b for b in boot if b]
        out[label] = {"window_s": round(t1 - t0, 2), "rounds": ph["rounds"], "per_peer": per_peer,
                      "bootstrap_per_round": {k: round(sum(b[k] for b in boot) / ph["rounds"]) for k in boot[0]} if boot else None}
    return out


def traffic_summary(run: dict, label: str) -> dict | None:
    """Mean, median and busiest peer's TCP messages and bytes per round (sent and received by its p2pd)."""
    t = run.get("traffic", {}).get(label)
    if not t or not t["per_peer"]:
        return None
    rows = list(t["per_peer"].values())
    out = {"method": "kernel tcp_info of each peer's p2pd sockets (ss -tinHe), data segments = messages",
           "peers_metered": len(rows), "window_s": t["window_s"], "bootstrap_per_round": t["bootstrap_per_round"]}
    for k in ("messages_sent", "messages_received", "bytes_sent", "bytes_received"):
        xs = [r[k] for r in rows]
        out[k] = {"mean": round(statistics.mean(xs)), "p50": round(statistics.median(xs)), "max": round(max(xs))}
    return out


def summarize_exchange(run: dict, phases: list[dict]) -> list[dict]:
    res = run["results"]
    names = sorted(res)
    n = len(names)
    out = []
    for ph in phases:
        size = ph["size"]
        pair_lat, all_lat, seen_lat, pull_lat, pub_s, coll_s, exch_s, polls, late = [], [], [], [], [], [], [], [], []
        delivered = expected = 0
        payload_bytes = []
        rows = {nm: [r for r in res[nm]["rounds"] if r["size"] == size] for nm in names}
        rounds = sorted({r["round"] for nm in names for r in rows[nm]})
        for rnd in rounds:
            by = {nm: next((r for r in rows[nm] if r["round"] == rnd), None) for nm in names}
            for sender in names:
                s = by[sender]
                if s is None:
                    continue
                payload_bytes.append(s["bytes"])
                lats = []
                for recv in names:
                    rr = by[recv]
                    if recv == sender or rr is None:  # a receiver that skipped this round expected nothing
                        continue
                    expected += 1
                    if sender in rr["arrived"]:
                        delivered += 1
                        lat = rr["arrived"][sender] - s["publish_start"]
                        lats.append(lat)
                        pair_lat.append(lat)
                        if sender in rr["seen"]:  # only where the code has the old `_fetch` hook
                            seen_lat.append(rr["seen"][sender] - s["publish_start"])
                            pull_lat.append(rr["arrived"][sender] - rr["seen"][sender])
                if lats and len(lats) == sum(1 for nm in names if nm != sender and by[nm]):
                    all_lat.append(max(lats))
            for nm in names:
                r = by[nm]
                if r:
                    pub_s.append(r["publish_s"])
                    coll_s.append(r["collect_s"])
                    exch_s.append(r["publish_s"] + r["collect_s"])
                    polls.append(r["polls"])
                    late.append(r["late_s"])
        raws = [x for nm in names for x in res[nm]["raw"] if x["size"] == size]
        store = [x["store_s"] for x in raws if x["stored"]]
        get = [x["get_s"] for x in raws if x["get_ok"]]
        floor = [x["store_s"] + x["get_s"] for x in raws if x["stored"] and x["get_ok"]]
        pulls = [x["pull_s"] for x in raws if x["pull_ok"]]
        nbytes = statistics.median(payload_bytes) if payload_bytes else 0
        out.append({
            "n": n, "size": size, "transport": transport(run), "imported_from": imported_from(run), "loadavg": run.get("loadavg"), "payload_bytes": nbytes, "rounds": len(rounds), "period_s": ph["period"],
            "pairs_expected": expected, "pairs_delivered": delivered,
            "delivery_fraction": round(delivered / expected, 4) if expected else None,
            "wanted_fraction_met": wanted_met(run, res, names, rounds, lambda nm, rnd: next((r for r in rows[nm] if r["round"] == rnd), None)),
            "per_peer_per_round": traffic_summary(run, size),
            "latency_ms": {"p50": ms(pct(pair_lat, .5)), "p95": ms(pct(pair_lat, .95)), "max": ms(max(pair_lat, default=None))},
            "latency_all_receivers_ms": {"p50": ms(pct(all_lat, .5)), "p95": ms(pct(all_lat, .95))},
            "announce_seen_ms_p50": ms(pct(seen_lat, .5)), "pull_and_check_ms_p50": ms(pct(pull_lat, .5)),
            "publish_ms": {"p50": ms(pct(pub_s, .5)), "p95": ms(pct(pub_s, .95))},
            "collect_ms": {"p50": ms(pct(coll_s, .5)), "p95": ms(pct(coll_s, .95))},
            "exchange_per_round_ms": {"p50": ms(pct(exch_s, .5)), "p95": ms(pct(exch_s, .95))},
            "round_start_skew_ms_p95": ms(pct(late, .95)),
            "dht_polls_per_collect_p50": pct(polls, .5),
            "drops": round_drops(r for nm in names for r in rows[nm]),
            "round_errors": sorted({r["error"] for nm in names for r in rows[nm] if r.get("error")}),
            "rounds_skipped_fraction": skipped_fraction(res, size),
            "payload_bytes_per_round": int(nbytes * n * (n - 1)),
            "loopback_bytes_per_round": lo_per_round(run, size, len(rounds)),
            "cpu_s_per_peer_round": cpu_per_round(run, size, n, len(rounds)),
            "floor_ms": {"dht_store_p50": ms(pct(store, .5)), "dht_get_p50": ms(pct(get, .5)),
                         "dht_store_plus_get_p50": ms(pct(floor, .5)), "stream_pull_p50": ms(pct(pulls, .5)),
                         "samples": len(raws), "dht_ok": len(floor), "pull_ok": len(pulls)},
        })
    return out


def _usage(run: dict, size: str) -> list[dict]:
    """One usage record per worker process (its peers all carry the same one)."""
    by_proc = {v["startup"]["launch"]: v.get("usage", {}).get(size) for v in run["results"].values()}
    return [u for u in by_proc.values() if u]


def lo_per_round(run: dict, size: str, rounds: int) -> int:
    """Loopback bytes (machine-wide, so other jobs' too) per round: the longest window any worker saw."""
    us = _usage(run, size)
    return int(max((u["lo_bytes"] for u in us), default=0) / max(1, rounds))


def cpu_per_round(run: dict, size: str, n: int, rounds: int) -> dict:
    us = _usage(run, size)
    if not us or not rounds:
        return {}
    k = n * rounds
    py, pd = sum(u["python_cpu_s"] for u in us), sum(u["p2pd_cpu_s"] for u in us)
    wall = max(u["wall_s"] for u in us)
    b = run["boot_cpu"].get(size, {})
    return {"python": round(py / k, 3), "p2pd": round(pd / k, 3),
            "bootstrap_per_round": round(b.get("cpu_s", 0) / rounds, 3),
            "cores_busy": round((py + pd + b.get("cpu_s", 0) * wall / max(b.get("wall_s", 1), 1e-9)) / wall, 2)}


def summarize_peers(run: dict) -> dict:
    res = run["results"]
    st = [v["startup"] for v in res.values()]
    mems = {}
    for v in res.values():  # one entry per process
        mems[v["startup"]["launch"]] = (v["peers_in_process"], v["mem_idle"], v["mem_after"])
    per_peer = []
    for k, idle, after in mems.values():
        per_peer.append({key: after[key] / k for key in ("python_rss_mb", "python_pss_mb", "p2pd_rss_mb", "p2pd_pss_mb")}
                        | {"idle_python_rss_mb": idle["python_rss_mb"] / k, "idle_python_pss_mb": idle["python_pss_mb"] / k})

    def med(key, rows):
        xs = [r[key] for r in rows]
        return round(statistics.median(xs), 2) if xs else None

    first = [s for s in st if s["peers_in_process_before"] == 0]
    return {
        "startup_s": {k: med(k, first) for k in ("interpreter_s", "import_s", "node_start_s", "first_contact_s", "join_s",
                                                 "to_first_contact_s", "to_ready_s")},
        "startup_s_max": {k: round(max(s[k] for s in first), 2) for k in ("to_first_contact_s", "to_ready_s")},
        "node_start_s_later_peers_in_process": med("node_start_s", [s for s in st if s["peers_in_process_before"] > 0]),
        "all_up_s": round(run["all_up_s"], 1),
        "memory_mb_per_peer": {k: med(k, per_peer) for k in per_peer[0]} if per_peer else {},
        "bootstrap_memory_mb": {k: round(v, 1) for k, v in run["boot_memory"].items()},
        "workers_exit_s": run["workers_exit_s"] and round(run["workers_exit_s"], 2),
        "bootstrap_sigterm_exit_s": run["bootstrap_sigterm_exit_s"] and round(run["bootstrap_sigterm_exit_s"], 2),
    }


def summarize_sim(run: dict, ph: dict) -> dict:
    want, label = ph["want_peers"], ph["label"]
    res = {nm: {**v, "rounds": [r for r in v["rounds"] if r["phase"] == label]} for nm, v in run["results"].items()}
    names = sorted(res)
    n = len(names)
    lat, per_round, coll = [], [], []
    delivered = expected = 0
    rounds = sorted({r["round"] for nm in names for r in res[nm]["rounds"]})
    for rnd in rounds:
        by = {nm: next((r for r in res[nm]["rounds"] if r["round"] == rnd), None) for nm in names}
        d = 0
        for recv in names:
            rr = by[recv]
            if rr:
                coll.append(rr["collect_s"])
            for sender in names:
                if sender == recv or rr is None or by[sender] is None:  # pairs where both took part in the round
                    continue
                if not same_shard(run, recv, sender):  # with topic shards, pairs within a shard
                    continue
                expected += 1
                if sender in rr["arrived"]:
                    delivered += 1
                    d += 1
                    lat.append(rr["arrived"][sender] - by[sender]["publish_start"])
        both = sum(1 for a in names for b in names if a != b and by[a] and by[b] and same_shard(run, a, b))
        per_round.append(round(d / both, 4) if both else None)
    return {"peers": n, "transport": transport(run), "imported_from": imported_from(run), "loadavg": run.get("loadavg"), "processes": len({v["startup"]["launch"] for v in res.values()}), "variant": label,
            "rounds": len(rounds), "round_period_s": ph["period"], "collect_timeout_s": run["timeout"], "want_peers": want,
            "bench_validation_cache": bool(ph.get("cache")),
            "delivery_fraction": round(delivered / expected, 4) if expected else None,
            "wanted_fraction_met": wanted_met(run, res, names, rounds, lambda nm, rnd: next((r for r in res[nm]["rounds"] if r["round"] == rnd), None), want),
            "per_peer_per_round": traffic_summary(run, label),
            "topic_per_peer_round": {k: round(statistics.fmean(
                v.get("topic", {}).get(label, {}).get(k, 0) for v in res.values()) / max(1, len(rounds)), 1)
                for k in TOPIC_COUNTERS},
            "cpu_s_per_peer_round": cpu_per_round(run, label, n, len(rounds)),
            "dht_polls_per_collect_p50": pct([r["polls"] for nm in names for r in res[nm]["rounds"]], .5),
            "round_errors": sorted({r["error"] for nm in names for r in res[nm]["rounds"] if r.get("error")}),
            "rounds_with_error": sum(1 for nm in names for r in res[nm]["rounds"] if r.get("error")),
            "live_peers_seen_p50": pct([r["live"] for nm in names for r in res[nm]["rounds"]], .5),
            "live_peers_seen_min": min((r["live"] for nm in names for r in res[nm]["rounds"]), default=None),
            "drops": round_drops(r for nm in names for r in res[nm]["rounds"]),
            "rounds_skipped_fraction": skipped_fraction(run["results"], label),
            "publish_ms": {"p50": ms(pct([r["publish_s"] for nm in names for r in res[nm]["rounds"]], .5)),
                           "p95": ms(pct([r["publish_s"] for nm in names for r in res[nm]["rounds"]], .95))},
            "delivery_fraction_per_round": per_round,
            "round_start_late_s_p50": round(pct([r["late_s"] for nm in names for r in res[nm]["rounds"]], .5) or 0, 2),
            "latency_ms": {"p50": ms(pct(lat, .5)), "p90": ms(pct(lat, .9)), "p95": ms(pct(lat, .95)), "max": ms(max(lat, default=None))},
            "collect_ms": {"p50": ms(pct(coll, .5)), "p95": ms(pct(coll, .95)), "max": ms(max(coll, default=None))},
            "latency_cdf_s": [round(x, 3) for x in sorted(lat)[:: max(1, len(lat) // 200)]],
            "pairs_expected": expected, "pairs_delivered": delivered}


def imported_from(run: dict) -> list[str]:
    """The p2pswarm package(s) the peers imported: one, inside the code under test."""
    return sorted({str(Path(v["imported"]).parent.parent) for v in run["ready"].values() if v.get("imported")})


def transport(run: dict) -> str:
    """'gossip' or 'dht' as the peers' daemons ran (mixed: both seen, which would be a bench bug)."""
    kinds = sorted({v.get("transport", {}).get("transport", "dht") for v in run["ready"].values()})
    return kinds[0] if len(kinds) == 1 else "+".join(kinds)


def same_shard(run: dict, a: str, b: str) -> bool:
    """Whether peers a and b announce in the same topic shard (always, with one topic): a peer draws its K
    announcers among its shard's, so only those pairs are wanted."""
    shards = run.get("shards", 1)
    if shards <= 1:
        return True
    from p2pswarm.comm.hivemind.gossip import shard_of

    ids = {n: run["ready"][n]["peer_id"] for n in (a, b)}
    return shard_of(ids[a], shards) == shard_of(ids[b], shards)


def wanted_met(run: dict, res: dict, names: list[str], rounds: list[int], row, want: int | None = None) -> float | None:
    """Share of the batches the collects asked for that arrived: min(K, others in the round) per collect, where K
    is the phase's want_peers, else the code's own sample size (`sample_peers`, gossip) or want_peers, and 0
    means every other peer that took part in the round."""
    target = got = 0
    for rnd in rounds:
        by = {nm: row(nm, rnd) for nm in names}
        for recv, rr in by.items():
            if not rr:
                continue
            cs = run["ready"].get(recv, {}).get("comm_settings", {})
            k = want if want else (cs.get("sample_peers") or cs.get("want_peers") or 0)
            others = [s for s in names if s != recv and by[s] and same_shard(run, recv, s)]
            t = min(k, len(others)) if k else len(others)
            target += t
            got += min(t, sum(1 for s in others if s in rr["arrived"]))
    return round(got / target, 4) if target else None


def round_drops(rounds) -> dict:
    """Payloads dropped during these rounds' collects, by reason (pull_timeout: not in by the deadline)."""
    out: Counter[str] = Counter()
    for r in rounds:
        out.update(r.get("drops", {}))
    return dict(out)


def skipped_fraction(results: dict, label: str) -> float:
    done = sum(1 for v in results.values() for r in v["rounds"] if r["phase"] == label)
    skipped = sum(1 for v in results.values() for r in v.get("skipped", []) if r["phase"] == label)
    return round(skipped / (done + skipped), 3) if done + skipped else 0.0


def plot_traffic(paths: list[Path], out: Path) -> None:
    """Per-peer bytes and TCP segments out per round against N, one line per result file (e.g. one topic
    against topic shards): whether a peer's cost is flat in N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in paths:
        res = json.loads(path.read_text())
        size = res.get("settings", {}).get("shard_size", 0)
        label = f"topic shards of {size}" if size else "one topic"
        sims = sorted((s for s in res.get("simulations", []) if s.get("per_peer_per_round")), key=lambda s: s["peers"])
        ns = [s["peers"] for s in sims]
        for ax, key, scale in ((axes[0], "bytes_sent", 1024), (axes[1], "messages_sent", 1)):
            ax.plot(ns, [s["per_peer_per_round"][key]["mean"] / scale for s in sims], "o-", label=label)
    for ax, title in zip(axes, ("KiB out per peer and round", "TCP segments out per peer and round")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("simulated peers (K = 8)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("a peer's cost as the swarm grows, 127.0.0.1 (bench/swarm_exchange.py --plot-traffic)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    code = result["codes"][-1]["label"] if result.get("codes") else None  # the current tree's runs (see "runs" for all)
    ex = [e for e in result["exchange"] if e.get("code", code) == code]
    sims = [s for s in result.get("simulations", []) if s.get("code", code) == code]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"30KB": "tab:blue", "1MB": "tab:red"}

    def series(size):
        return sorted((r for r in ex if r["size"] == size), key=lambda r: r["n"])

    ax = axes[0]
    for size, color in colors.items():
        rows = series(size)
        if not rows:
            continue
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["latency_all_receivers_ms"]["p50"] for r in rows], "o-", color=color, label=f"{size}: publish → all peers, p50")
        ax.plot(ns, [r["latency_all_receivers_ms"]["p95"] for r in rows], "o--", color=color, alpha=.6, label=f"{size}: p95")
        ax.plot(ns, [r["floor_ms"]["dht_store_plus_get_p50"] for r in rows], "s:", color=color, alpha=.5, label=f"{size}: raw DHT store+get p50")
        ax.plot(ns, [r["floor_ms"]["stream_pull_p50"] for r in rows], "^:", color=color, alpha=.5, label=f"{size}: raw stream pull p50")
    default = sorted((s for s in sims if s["variant"] == "all"), key=lambda s: s["peers"])
    cached = [s for s in sims if s.get("bench_validation_cache")]
    if default:
        ax.plot([s["peers"] for s in default], [s["latency_ms"]["p50"] for s in default], "D-", color="tab:green",
                label="30KB simulation (several peers a process): pair p50 of delivered")
        ax.plot([s["peers"] for s in default], [s["latency_ms"]["p95"] for s in default], "D--", color="tab:green", alpha=.6,
                label="simulation p95")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("peers")
    ax.set_ylabel("ms")
    ax.set_title("publish → held by the other peers")
    ax.legend(fontsize=6.5, loc="upper left")

    ax = axes[1]
    for size, color in colors.items():
        rows = series(size)
        if rows:
            ns = [r["n"] for r in rows]
            ax.plot(ns, [r["exchange_per_round_ms"]["p50"] for r in rows], "o-", color=color, label=f"{size}: publish+collect p50")
            ax.plot(ns, [r["exchange_per_round_ms"]["p95"] for r in rows], "o--", color=color, alpha=.6, label=f"{size}: p95")
    if default:
        ax.plot([s["peers"] for s in default], [s["collect_ms"]["p50"] + (s["publish_ms"]["p50"] or 0) for s in default], "D-",
                color="tab:green", label="simulation publish+collect p50")
    ax.axhline(1000, color="grey", lw=.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("peers")
    ax.set_ylabel("ms per round")
    ax.set_title("what the exchange adds to a round")
    ax.legend(fontsize=7)

    ax = axes[2]
    for size, color in colors.items():
        rows = series(size)
        if rows:
            ax.plot([r["n"] for r in rows], [r["delivery_fraction"] for r in rows], "o-", color=color, label=f"{size}, N processes")
    if default:
        ax.plot([s["peers"] for s in default], [s["delivery_fraction"] for s in default], "D-", color="tab:green",
                label=f"30KB simulation, want all, {default[0]['collect_timeout_s']:.0f} s deadline")
    for s in cached:
        ax.plot([s["peers"]], [s["delivery_fraction"]], "P", ms=11, color="tab:orange",
                label=f"simulation want {s['want_peers'] or 'all'} + bench-only validation cache")
    for s in sims:
        if s["want_peers"] and not s.get("bench_validation_cache"):
            ax.plot([s["peers"]], [s["wanted_fraction_met"]], "*", ms=12, color="tab:purple",
                    label=f"simulation want_peers={s['want_peers']}: share of wanted batches in")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("peers")
    ax.set_title("delivered within the collect deadline")
    ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"p2pswarm hivemind exchange on 127.0.0.1: {m['cpus']} cores shared, load average "
                 f"{m['loadavg_start'][0]}→{m.get('loadavg_end', ['?'])[0]} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 4, fewer rounds, 8- and 16-peer simulations (~3 min a code)")
    ap.add_argument("--ns", type=int, nargs="*", help="peer counts (default 2 4 8; quick 4)")
    ap.add_argument("--sim", nargs="*", metavar="PEERS[:VARIANTS]",
                    help="simulations, each PEERS[:VARIANT,...]: 'all' = want_peers 0, every live peer (the settings "
                         "default); 'wantK' = want_peers K; 'cache' = all + a bench-only record-validation cache. One swarm "
                         "per PEERS runs its variants one after another. Default 8 32 64:all,want8; quick 8 16; "
                         "none: --sim with no value")
    ap.add_argument("--per-process", type=int, default=8, help="simulation peers per Python process")
    ap.add_argument("--sim-timeout", type=float, default=10.0, help="simulation collect deadline (settings default)")
    ap.add_argument("--sim-rounds", type=int, help="simulation rounds per variant (default 3; quick 2)")
    ap.add_argument("--out", type=Path, help="result JSON (the PNG goes beside it)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, per-peer records)")
    ap.add_argument("--replot", type=Path, metavar="JSON", help="redraw the PNG beside a result JSON, then exit")
    ap.add_argument("--ref", action="append", default=[], metavar="REF",
                    help="also measure this git revision (e.g. bdf3333, the DHT-polling exchange), exported with git "
                         "archive and run first, then the current tree: old and new side by side (repeatable)")
    ap.add_argument("--comm-arg", action="append", default=[], metavar="KEY=JSON",
                    help="extra HivemindComm keyword for every peer, where the code under test accepts it "
                         "(e.g. sample_peers=8); ignored by a revision that has no such keyword")
    ap.add_argument("--shard-size", type=int, default=0, metavar="N",
                    help="the bootstrap keeps the clock and splits the topic into shards of at most N peers, which "
                         "the peers follow (issue #13: per-peer traffic flat in N); 0: no keeper, one topic")
    ap.add_argument("--plot-traffic", type=Path, nargs="+", metavar="JSON",
                    help="draw per-peer bytes and segments against N, a line per result file, to --out (default "
                         "results/swarm_exchange.traffic.png), then exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.plot_traffic:
        plot_traffic(args.plot_traffic, args.out or RESULTS / "swarm_exchange.traffic.png")
        return
    quick = args.quick
    ns = args.ns if args.ns is not None else ([4] if quick else [2, 4, 8])
    sims = [(int(v.split(":")[0]), (v.split(":")[1] if ":" in v else "all").split(",")) for v in
            (args.sim if args.sim is not None else (["8", "16"] if quick else ["8", "32", "64:all,want8"]))]
    out = args.out or RESULTS / ("swarm_exchange.quick.json" if quick else "swarm_exchange.json")
    rounds = {"30KB": 3, "1MB": 2} if quick else {"30KB": 10, "1MB": 5}
    period = {"30KB": 1.5, "1MB": 3.0}
    phases = [{"size": s, "rounds": rounds[s], "period": period[s]} for s in ("30KB", "1MB")]
    raw = {"reps": 1 if quick else 3, "gap": {"30KB": 0.5, "1MB": 1.0}}
    collect_timeout = 10.0  # the settings default (collect_timeout), want_peers 0 = every live member
    comm_args = dict(kv.split("=", 1) for kv in args.comm_arg)
    comm_args = {k: json.loads(v) for k, v in comm_args.items()}
    work = Path(tempfile.mkdtemp(prefix="swarm_exchange-"))
    load0 = os.getloadavg()
    t_begin = time.time()
    result: dict = {"benchmark": "swarm_exchange", "command": "python " + " ".join(["bench/swarm_exchange.py", *sys.argv[1:]]),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "loadavg_start": [round(x, 1) for x in load0],
                                "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                    "settings": {"collect_timeout_s": collect_timeout, "want_peers": 0, "round_period_s": period,
                                 "comm_args": comm_args, "shard_size": args.shard_size,
                                 "payload_shape": {k: {"groups": g, "completions": c, "chars": ch} for k, (g, c, ch) in SIZES.items()},
                                 "raw_floor_reps": raw["reps"]},
                    "codes": [], "runs": [], "exchange": [], "peers": [], "simulations": [], "simulation_startup": []}
    try:
        codes = [export_ref(ref, work) for ref in args.ref] + [this_code()]
        for code in codes:
            result["codes"].append({k: v for k, v in code.items() if k != "path"})
            label = code["label"]
            print(f"=== code under test: {label} ({code['path']})", flush=True)
            for n in ns:
                print(f"N={n}: {n} peer processes + bootstrap, staggered start, {phases}", flush=True)
                run = run_swarm(work / f"{code['slug']}-n{n}", n, 1, phases, timeout=collect_timeout, want_peers=0,
                                staggered=True, raw=raw, code=code["path"], comm_args=comm_args,
                                shard_size=args.shard_size)
                ex = [e | {"code": label} for e in summarize_exchange(run, phases)]
                pe = summarize_peers(run) | {"n": n, "code": label}
                result["exchange"].extend(ex)
                result["peers"].append(pe)
                result["runs"].extend(run_row(e, label, "processes") for e in ex)
                for e in ex:
                    print(f"  {e['size']:>5} ({e['payload_bytes'] / 1024:.0f} KiB) [{e['transport']}]: delivered "
                          f"{e['delivery_fraction']}, pair p50/p95 {e['latency_ms']['p50']}/{e['latency_ms']['p95']} ms, "
                          f"publish+collect p50/p95 {e['exchange_per_round_ms']['p50']}/{e['exchange_per_round_ms']['p95']} ms; "
                          f"per peer per round {brief_traffic(e['per_peer_per_round'])}", flush=True)
                print(f"  start-up {pe['startup_s']}; memory/peer {pe['memory_mb_per_peer']}", flush=True)
            for sim_peers, variants in sims:
                per = min(args.per_process, sim_peers)
                sim_rounds = args.sim_rounds or (2 if quick else 3)
                phases_sim = [{"size": "30KB", "label": v, "rounds": sim_rounds, "period": args.sim_timeout + 4, "gap_after": 6.0,
                               "want_peers": int(v[4:]) if v.startswith("want") else 0, "cache": v == "cache"} for v in variants]
                print(f"simulation: {sim_peers} peers, {per} per process, variants {variants} ({sim_rounds} rounds each)", flush=True)
                mem_before = avail_mb()
                run = run_swarm(work / f"{code['slug']}-sim{sim_peers}", sim_peers, per, phases_sim, timeout=args.sim_timeout,
                                want_peers=0, staggered=False, raw=None, code=code["path"], comm_args=comm_args,
                                shard_size=args.shard_size)
                st = summarize_peers(run) | {"peers": sim_peers, "peers_per_process": per, "mem_available_before_mb": mem_before,
                                             "code": label}
                result["simulation_startup"].append(st)
                print(f"  up in {st['all_up_s']} s; memory/peer {st['memory_mb_per_peer']}", flush=True)
                for ph in phases_sim:
                    sim = summarize_sim(run, ph) | {"peers_per_process": per, "code": label, "shards": run.get("shards", 1)}
                    result["simulations"].append(sim)
                    result["runs"].append(run_row(sim, label, "simulated"))
                    print(f"  [{ph['label']}] [{sim['transport']}] delivered {sim['delivery_fraction']} (per round "
                          f"{sim['delivery_fraction_per_round']}), wanted met {sim['wanted_fraction_met']}, latency "
                          f"{sim['latency_ms']}, collect {sim['collect_ms']}, publish {sim['publish_ms']}, skipped "
                          f"{sim['rounds_skipped_fraction']}, per peer per round {brief_traffic(sim['per_peer_per_round'])}; "
                          f"topic messages sent / read {sim['topic_per_peer_round']['gossip_sent']} / "
                          f"{sim['topic_per_peer_round']['gossip_received']}",
                          flush=True)
    finally:
        result["machine"]["loadavg_end"] = [round(x, 1) for x in os.getloadavg()]
        result["wall_s"] = round(time.time() - t_begin, 1)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s']} s")


def run_row(e: dict, code: str, kind: str) -> dict:
    """The issue's per-run record: what to compare between codes and N at a glance."""
    n = e.get("n", e.get("peers"))
    ex = e.get("exchange_per_round_ms")
    if ex is None:  # a simulation: publish + collect of the same rounds
        ex = {"p50": e["collect_ms"]["p50"] and round((e["publish_ms"]["p50"] or 0) + e["collect_ms"]["p50"], 1),
              "p95": e["collect_ms"]["p95"] and round((e["publish_ms"]["p95"] or 0) + e["collect_ms"]["p95"], 1)}
    t = e.get("per_peer_per_round") or {}
    return {"code": code, "transport": e["transport"], "peers_are": kind, "n": n, "loadavg": e.get("loadavg"),
            "payload": e.get("size", "30KB"), "variant": e.get("variant"),
            "delivered_fraction": e["delivery_fraction"], "wanted_fraction_met": e.get("wanted_fraction_met"),
            "rounds_skipped_fraction": e.get("rounds_skipped_fraction"),
            "exchange_ms": ex,
            "per_peer_per_round": {k: t[k]["mean"] for k in ("messages_sent", "messages_received", "bytes_sent", "bytes_received")
                                   if k in t} | ({"busiest_peer_bytes": max(t["bytes_sent"]["max"], t["bytes_received"]["max"])}
                                                 if t else {})}


def brief_traffic(t: dict | None) -> str:
    if not t:
        return "not metered"
    return (f"{t['messages_sent']['mean']} msgs / {t['bytes_sent']['mean'] / 1024:.0f} KiB out, "
            f"{t['bytes_received']['mean'] / 1024:.0f} KiB in (busiest {t['bytes_sent']['max'] / 1024:.0f} KiB out)")


def this_code() -> dict:
    """The tree this file belongs to, as its git revision (+ "-dirty" with uncommitted changes)."""
    rev = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "p2pswarm", "bootstrap"))  # the code the peers run, not bench/
    return {"label": rev + ("-dirty" if dirty else ""), "ref": "worktree", "commit": git("rev-parse", "HEAD"),
            "path": ROOT, "slug": "here"}


def export_ref(ref: str, work: Path) -> dict:
    """`git archive REF` of this repository, unpacked into the work directory: its peers and bootstrap import it.
    The bench itself (this file) stays the current one, so both codes are measured the same way."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    dest = work / f"ref-{commit[:10]}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return {"label": commit[:7], "ref": ref, "commit": commit, "path": dest, "slug": f"ref-{commit[:7]}"}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def avail_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


if __name__ == "__main__":
    main()

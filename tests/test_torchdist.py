"""The torch.distributed backend with real gloo processes on 127.0.0.1: torchrun swarms of 2 and 3 ranks
exchange rollouts every round like the in-process swarm; a bad rank's bytes are dropped and counted; a rank
that dies or lags surfaces as one clear line on the others within a bounded time, never a hang."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HANG, PROCESS_TEST_TIMEOUT, ROOT, jsonl, make_settings, run_process, wait_until

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo process tests run on Linux"),
              pytest.mark.timeout(PROCESS_TEST_TIMEOUT)]

# dist_timeout: how long a rank waits in a collective for the slowest; generous, as ranks start unevenly on a
# busy machine (it delays nothing when all arrive).
RUN_ARGS = ["run", "--set", "comm=torch", "--headless", "--rounds", "2", "--set", "eval_every=0",
            "--set", "tasks_per_round=2", "--set", "dist_timeout=300"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("P2PSWARM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                          "MASTER_ADDR", "MASTER_PORT", "NODE_ID", "IDENTITY_PATH")}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun(tmp_path: Path, nproc: int, *args: str, env: dict[str, str] | None = None, timeout: float = HANG):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "p2pswarm", *args]
    res = run_process(cmd, timeout, cwd=tmp_path, env=env or clean_env(), stderr=subprocess.STDOUT)
    return res.returncode, res.stdout


def train_script(tmp_path: Path, nproc: int, *args: str, env: dict[str, str], timeout: float = HANG):
    """scripts/train_torch.sh 1 N ... (the launcher users run) on 127.0.0.1 with a free port."""
    env = {**env, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    res = run_process(["bash", str(ROOT / "scripts" / "train_torch.sh"), "1", str(nproc), *args], timeout, cwd=tmp_path,
                      env=env, stderr=subprocess.STDOUT)
    return res.returncode, res.stdout


@pytest.fixture(scope="module")
def inprocess_row(tmp_path_factory):
    """A metrics row of the in-process swarm: the structure every transport's rows share."""
    from p2pswarm.node import build_swarm, run_agents

    tmp = tmp_path_factory.mktemp("inprocess")
    agents = build_swarm(make_settings(tmp, agents=2, rounds=1, tasks_per_round=2, collect_timeout=60))
    run_agents(agents)
    return agents[0].run_dir.read_metrics()[0]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_exchange_rollouts_every_round(tmp_path, world, inprocess_row):
    runs = tmp_path / "runs"
    if world == 2:  # through the launcher script; nodes named after their peer ids
        rc, out = train_script(tmp_path, world, *RUN_ARGS[1:], "--set", f"runs_dir={runs}", env=clean_env())
    else:  # torchrun itself; nodes named <NODE_ID>-rank<R>
        rc, out = torchrun(tmp_path, world, *RUN_ARGS, "--set", f"runs_dir={runs}", env=clean_env(NODE_ID="worker"))
    assert rc == 0, out[-4000:]

    exp = runs / "default"
    assert sorted(p.name for p in exp.glob("identity-rank*.key")) == [f"identity-rank{r}.key" for r in range(world)]
    dirs = sorted(d for d in exp.iterdir() if d.is_dir())
    assert len(dirs) == world
    if world == 3:
        assert [d.name for d in dirs] == ["worker-rank0", "worker-rank1", "worker-rank2"]
    rows = {d.name: jsonl(d / "metrics.jsonl") for d in dirs}
    peers = {r[0]["peer"] for r in rows.values()}
    assert len(peers) == world
    tasks = 2
    for name, rs in rows.items():
        assert [r["round"] for r in rs] == [0, 1]  # the same clock on every rank
        assert all(r["node"] == name for r in rs)
        assert all(r["swarm_groups_received"] == (world - 1) * tasks for r in rs), rs
        assert [r["comm"]["batches_received"] for r in rs] == [world - 1, 2 * (world - 1)]
        assert all(r["comm"]["batches_sent"] == i + 1 for i, r in enumerate(rs))
        # Identical structure to the in-process swarm's rows, transport counters included.
        assert all(set(r) == set(inprocess_row) and set(r["comm"]) == set(inprocess_row["comm"]) for r in rs)
        events = jsonl(exp / name / "events.jsonl")
        me = rs[0]["peer"]
        received = [e for e in events if e["kind"] == "rollouts_received"]
        assert [(e["round"], e["stage"]) for e in received] == [(0, 0), (1, 0)]
        assert all(set(e["peers"]) == peers - {me} and e["groups"] == (world - 1) * tasks for e in received)
        assert [e["round"] for e in events if e["kind"] == "round_started"] == [0, 1]
        assert (exp / name / "checkpoints" / "round_000001").is_dir()
    # Only rank 0 prints round lines (and lists every rank once).
    assert len(re.findall(r"round +1 \|", out)) == 1, out[-3000:]
    assert all(f"rank {r}: " in out for r in range(world))


def launch_ranks(procs, world: int, argv_for_rank, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Ranks started directly from the env:// variables (as a cluster scheduler would), logs rank<R>.log."""
    port = str(free_port())
    return [procs.start(f"rank{r}", argv_for_rank(r),
                        env=clean_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(extra_env or {})))
            for r in range(world)]


def test_a_rank_that_dies_stops_the_others_with_a_clear_message(tmp_path, procs):
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "p2pswarm", "run", "--set", "comm=torch", "--headless", "--rounds", "500",
            "--set", "eval_every=0", "--set", "tasks_per_round=2", "--set", f"runs_dir={runs}",
            "--set", "dist_timeout=20", "--set", "checkpoint_every=1000"]
    ranks = launch_ranks(procs, 2, lambda r: argv)

    def both_finished_a_round():  # (or one of them exited: the assertion below says why)
        return sum(len(jsonl(p)) for p in runs.glob("default/*/metrics.jsonl")) >= 2 or any(p.poll() is not None for p in ranks)

    wait_until(both_finished_a_round, HANG, "round finished by both ranks", lambda: procs.log("rank0"))
    assert all(p.poll() is None for p in ranks), procs.log("rank0")[-3000:] + procs.log("rank1")[-3000:]
    ranks[1].kill()
    # Within a bound only a hang reaches (dist_timeout is 20 s), rank 0 stops with one line naming rank 1.
    assert procs.wait_exit("rank0", HANG, rc=None) != 0
    out = procs.log("rank0")
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out[-3000:]
    assert re.search(r"rank 1 \(\S+ on \S+\) stopped answering", lines[0]), lines[0]
    assert "Traceback" not in out


WORKER = r'''
import json, os, sys, time
from pathlib import Path
import torch
from p2pswarm import wire
from p2pswarm.comm.torchdist import RankFailure
from p2pswarm.comm.torchdist.coordinator import TorchDistCoordinator
from p2pswarm.comm.torchdist.manager import TorchDistComm
from p2pswarm.identity import Identity
from p2pswarm.types import Group, Task

rank, timeout = int(os.environ["RANK"]), float(sys.argv[1])
Path(f"ready{rank}").touch()  # start the clock together: imports take a while on a busy machine
deadline = time.monotonic() + 300
while not all(Path(f"ready{r}").exists() for r in range(2)) and time.monotonic() < deadline:
    time.sleep(0.05)
results = {}

def report(**kw):
    results.update(kw)
    print("RESULT " + json.dumps(results), flush=True)

comm = TorchDistComm(Identity.generate(), "exp", name=f"w{rank}", device=torch.device("cpu"), timeout=timeout,
                     lockstep={"rounds": 9})
coord = TorchDistCoordinator(comm)
wish, stops = {"stop": False}, []
coord.bind_stop(lambda: wish["stop"], lambda: stops.append(True))

def groups(n):
    return [Group(Task(f"t{i}", "chain_sum", "2 + 3 =", "5"), ["<answer>5</answer>", "4"], peer=comm.peer_id)
            for i in range(n)]

report(peers=[p.name for p in comm.peers()], start=coord.start_round(3 * rank))  # resume points 0 and 3
comm.publish(3, 0, groups(rank + 1))
report(honest=len(comm.collect(3, 0)))
report(next=coord.next_round(3))

# Rank 1 turns bad: a broken signature, a batch signed by a key it never announced, an oversized payload.
for kind, rnd in (("bad_signature", 4), ("wrong_peer", 5), ("too_large", 6)):
    comm.publish(rnd, 0, groups(1))
    if rank == 1:
        if kind == "bad_signature":
            b = bytearray(comm._outbox[(rnd, 0)]); b[-3] ^= 0xFF; comm._outbox[(rnd, 0)] = bytes(b)
        elif kind == "wrong_peer":
            other = Identity.generate()
            comm._outbox[(rnd, 0)] = wire.encode(wire.RolloutBatch("exp", rnd, 0, other.peer_id, groups(1)), other)
        else:
            comm._outbox[(rnd, 0)] = b"\0" * (wire.Limits().max_bytes + 1)
    report(**{kind: len(comm.collect(rnd, 0))})
report(counters=comm.counters())

wish["stop"] = rank == 1  # only rank 1 asks; every rank learns it at the same round boundary
report(after_stop=coord.next_round(6), stopped=len(stops))

try:  # out of step: rank 1 is a round ahead
    comm.publish(7 + rank, 0, [])
    comm.collect(7 + rank, 0)
    report(desync="no error")
except RankFailure as e:
    report(desync=str(e))
comm.group.failed = None  # the header exchange itself went through; carry on for the next scenario

if rank == 1:
    time.sleep(timeout + 3 * comm.group.heartbeat_interval + 2)  # busy (alive) past rank 0's timeout
try:
    comm.publish(9, 0, [])
    comm.collect(9, 0)
    report(slow="no error")
except RankFailure as e:
    report(slow=str(e))
comm.close()
'''


def test_bad_bytes_clock_stop_and_slow_ranks_over_gloo(tmp_path, procs):
    """Transport-level scenarios with two bare ranks (no model): fast, and each failure path exercised."""
    (tmp_path / "worker.py").write_text(WORKER)
    timeout = 5.0
    launch_ranks(procs, 2, lambda r: [sys.executable, "worker.py", str(timeout)])
    res = []
    for r in range(2):
        procs.wait_exit(f"rank{r}", HANG, rc=None)
        found = [json.loads(line[7:]) for line in procs.log(f"rank{r}").splitlines() if line.startswith("RESULT ")]
        assert found, procs.log(f"rank{r}")[-3000:]
        res.append(found[-1])
    r0, r1 = res
    assert r0["peers"] == ["w1"] and r1["peers"] == ["w0"]
    assert r0["start"] == r1["start"] == 3  # the furthest resume point
    assert (r0["honest"], r1["honest"]) == (2, 1)
    assert r0["next"] == r1["next"] == 4
    # Rank 0 dropped each bad batch and counted why; rank 1 still got rank 0's good ones.
    assert (r0["bad_signature"], r0["wrong_peer"], r0["too_large"]) == (0, 0, 0)
    assert (r1["bad_signature"], r1["wrong_peer"], r1["too_large"]) == (1, 1, 1)
    c = r0["counters"]
    assert (c["dropped_bad_signature"], c["dropped_wrong_peer"], c["dropped_too_large"]) == (1, 1, 1)
    assert c["batches_received"] == 1
    assert r1["counters"]["batches_received"] == 4
    # A stop wish from rank 1 stops both at the same boundary.
    assert r0["stopped"] == r1["stopped"] == 1 and r0["after_stop"] == r1["after_stop"] == 7
    for r in (r0, r1):
        assert "out of step" in r["desync"] and "rank 1 at round 8 stage 0" in r["desync"]
    # Rank 0 timed out waiting for rank 1, which was alive but elsewhere, and said so in one line.
    slow = r0["slow"]
    assert f"timed out after {timeout:.0f} s" in slow and "rank 1 (w1 on" in slow and "is alive but did not get here" in slow
    assert "dist_timeout" in slow and "\n" not in slow


def test_settings_for_the_torch_backend(monkeypatch):
    from p2pswarm.comm.torchdist.env import threads_per_rank
    from p2pswarm.settings import SettingsError, load_settings

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "P2PSWARM_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError, match=r"comm.*torchrun.*RANK"):
        load_settings(comm="torch")  # not started by torchrun: say how to launch instead of failing later
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(SettingsError, match="one agent per process"):
        load_settings(comm="torch", agents=2)
    assert load_settings(comm="torch").dist_timeout == 60  # at least a minute
    assert load_settings(comm="torch", collect_timeout=30).dist_timeout == 180
    assert load_settings(comm="torch", dist_timeout=5).dist_timeout == 5
    assert threads_per_rank({"LOCAL_WORLD_SIZE": "1"}) is None
    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank({"LOCAL_WORLD_SIZE": "3"}) == max(1, cores // 3)  # 1 on the 2-core CI machine


def test_round_clock_rule_without_processes():
    """The coordinator's decisions from given exchanges (a stand-in group): the furthest resume point, rank 0's
    round + 1 when every rank finished it, a stop wish from any rank stops this one, out of step otherwise."""
    from types import SimpleNamespace

    from p2pswarm.comm.torchdist import RankFailure
    from p2pswarm.comm.torchdist.coordinator import TorchDistCoordinator

    class Group:
        def __init__(self, rows):
            self.rows, self.failed, self.sent = rows, None, []

        def all_gather_ints(self, values, desc):
            self.sent.append(values)
            return self.rows

        def fail(self, why):
            self.failed = why
            return RankFailure(why)

    def coordinator(rows, rank=1):
        group = Group(rows)
        coord = TorchDistCoordinator(SimpleNamespace(group=group, rank=rank, world_size=len(rows)))
        return coord, group

    coord, group = coordinator([[0, 0], [3, 0], [2, 0]])
    assert coord.start_round(3) == 3
    coord, group = coordinator([[4, 0], [4, 0], [4, 0]])
    stops = []
    coord.bind_stop(lambda: True, lambda: stops.append(True))
    assert coord.next_round(4) == 5 and stops == []  # the wish travels; the exchange (rows) decides
    assert group.sent == [[4, 1]]
    coord, group = coordinator([[4, 0], [4, 1], [4, 0]])
    coord.bind_stop(lambda: False, lambda: stops.append(True))
    assert coord.next_round(4) == 5 and stops == [True]
    for rows in ([[5, 0], [4, 0]], [[4, 0], [5, 0]]):  # a rank behind rank 0, or ahead of it
        coord, group = coordinator(rows)
        with pytest.raises(RankFailure, match="out of step"):
            coord.next_round(4)
        shown = ", ".join(f"rank {r}: {row[0]}" for r, row in enumerate(rows))
        assert shown in group.failed and "\n" not in group.failed  # every later collective raises it too

"""The swarm over hivemind, as users run it: a bootstrap peer and peer processes on 127.0.0.1.

Every process is started in its own session and killed by PID (with its p2pd) at the end; every wait is
bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli

EXP = "hm-test"
ACTORS = str(ROOT / "tests" / "hivemind_actors.py")


class Procs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.tmp)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log(name), re.M)
            if m:
                return m
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{name}: no {pattern!r} within {timeout} s; log:\n{self.log(name)[-3000:]}")

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


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


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_bootstrap(procs: Procs, name: str = "boot", *extra: str) -> str:
    procs.start(name, [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity",
                       f"{name}.key", "--experiment", EXP, "--status-every", "2", *extra])
    return procs.wait_for(name, r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", 60).group(1)


def peer_cmd(tmp: Path, name: str, boot: str, rounds: int, *extra: str) -> list[str]:
    return cli("run", "--headless", "--experiment", EXP, "--node-id", name, "--rounds", str(rounds),
               "--initial-peers", boot, "--host", "127.0.0.1", "--output-dir", str(tmp / "runs" / name),
               "--set", "eval_every=0", "--set", "threads=1", "--set", "tasks_per_round=4",
               "--set", "collect_timeout=8", *extra)


def metrics(tmp: Path, name: str) -> list[dict]:
    path = tmp / "runs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_exit(p: subprocess.Popen, timeout: float, log: str) -> None:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{log[-3000:]}") from None
    assert rc == 0, log[-3000:]


@pytest.mark.slow
def test_bootstrap_and_three_peers_one_in_client_mode(procs, tmp_path):
    boot = start_bootstrap(procs, "boot", "--coordinator")
    names = ["ann", "bob", "cat"]
    for n in names:  # each waits for both others' batches (so a slow starter does not miss round 0)
        procs.start(n, peer_cmd(tmp_path, n, boot, 3, "--set", "collect_peers=2", "--set", "collect_timeout=40",
                                *(["--client-mode"] if n == "cat" else [])))
    for n in names:
        wait_exit(procs.procs[n], 150, procs.log(n))
    peer_ids = {n: re.search(r"\(peer (\w+)\)", procs.log(n)).group(1) for n in names}
    assert len(set(peer_ids.values())) == 3
    for n in names:
        rows = metrics(tmp_path, n)
        assert [r["round"] for r in rows] == [0, 1, 2], (n, procs.log(n)[-2000:])  # the clock advanced together
        per_peer = rows[-1]["comm"]["per_peer"]
        others = {m for m in names if m != n}
        senders = {name for name, c in per_peer.items() if c.get("groups", 0) > 0}
        assert others <= senders, (n, per_peer)  # swarm groups from both others, the client-mode peer included
        assert all(r["swarm_groups_received"] >= 4 for r in rows), n
        assert rows[-1]["comm"]["peers_seen"] >= 2
    # The bootstrap kept the clock: it saw each round finished by all three trainers.
    procs.wait_for("boot", r"round clock advanced to round 2 \(3 of 3", 20)
    procs.wait_for("boot", r"status: \d+ peer\(s\) connected", 10)
    # SIGTERM stops it cleanly, p2pd included.
    daemons = children(procs.procs["boot"].pid)
    procs.procs["boot"].send_signal(signal.SIGTERM)
    assert procs.procs["boot"].wait(timeout=20) == 0
    assert "stopped" in procs.log("boot")
    deadline = time.monotonic() + 10
    while any(alive(d) for d in daemons) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(d) for d in daemons)
    # Restarted with its identity, the bootstrap is the same peer and its clock resumes where it was.
    again = start_bootstrap(procs, "boot2", "--coordinator", "--identity", "boot.key")
    assert again.rsplit("/", 1)[1] == boot.rsplit("/", 1)[1]
    last = re.findall(r"round clock advanced to round (\d+)", procs.log("boot"))[-1]
    procs.wait_for("boot2", rf"round clock resumed at round {last} ", 20)


@pytest.mark.slow
def test_killed_peer_does_not_stall_the_swarm_and_resumes_with_its_identity(procs, tmp_path):
    boot = start_bootstrap(procs, "boot", "--coordinator")
    common = ("--set", "checkpoint_every=1", "--set", "collect_timeout=4")
    procs.start("ann", peer_cmd(tmp_path, "ann", boot, 12, *common))
    victim = procs.start("bob", peer_cmd(tmp_path, "bob", boot, 12, *common))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "runs" / "bob" / "checkpoints" / "round_000002").exists():
        time.sleep(0.2)
    assert (tmp_path / "runs" / "bob" / "checkpoints" / "round_000002").exists(), procs.log("bob")[-2000:]
    bob_id = re.search(r"\(peer (\w+)\)", procs.log("bob")).group(1)
    daemons = children(victim.pid)
    assert daemons, "the peer runs its p2pd as a child"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.time()
    deadline = time.monotonic() + 10
    while any(alive(d) for d in daemons) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(d) for d in daemons), "the killed node's p2pd outlived it"
    # ann keeps training: no round of hers waits much longer than the collect deadline for the dead peer.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [r for r in metrics(tmp_path, "ann") if r["time"] > killed_at + 12]:
        time.sleep(0.3)
    after = [r for r in metrics(tmp_path, "ann") if r["time"] > killed_at]
    assert len(after) >= 2, procs.log("ann")[-2000:]
    assert max(r["round_seconds"] for r in after) < 4 + 8  # collect_timeout + generous slack on a busy machine
    # bob comes back with the same identity file: same peer id, resumes from his checkpoint.
    done_before = max(r["round"] for r in metrics(tmp_path, "bob"))
    procs.start("bob2", peer_cmd(tmp_path, "bob", boot, 12, *common))
    procs.wait_for("bob2", r"resum", 90)
    wait_exit(procs.procs["bob2"], 150, procs.log("bob2"))
    assert re.search(r"\(peer (\w+)\)", procs.log("bob2")).group(1) == bob_id
    rounds = [r["round"] for r in metrics(tmp_path, "bob")]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 11  # no round twice, none rewound
    assert min(r for r in rounds if r > done_before) >= 3


@pytest.mark.slow
def test_hostile_peer_is_dropped_and_counted(procs, tmp_path):
    boot = start_bootstrap(procs, "boot", "--coordinator")
    procs.start("mallory", [sys.executable, ACTORS, "hostile", "mallory.key", EXP, "8", boot])
    procs.wait_for("mallory", r"announced round 7", 60)
    for n in ("ann", "bob"):
        # collect_peers=1: wait for one valid batch (the attacker's never count), so both play every round together
        procs.start(n, peer_cmd(tmp_path, n, boot, 5, "--set", "collect_timeout=30", "--set", "collect_peers=1"))
    for n in ("ann", "bob"):
        wait_exit(procs.procs[n], 150, procs.log(n))
    procs.wait_for("mallory", r"overwrite \w+: forged stored=False", 10)
    for n, other in (("ann", "bob"), ("bob", "ann")):
        rows = metrics(tmp_path, n)
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
        comm = rows[-1]["comm"]
        per_peer = comm["per_peer"]
        assert per_peer[other]["groups"] >= 5 * 4  # the honest peer's groups, every round
        assert per_peer["mallory"].get("groups", 0) == 0  # nothing of the attacker's reached the trainer
        for reason in ("bad_signature", "malformed", "too_large", "wrong_slot", "wrong_swarm"):
            assert comm.get(f"dropped_{reason}", 0) >= 1, (n, reason, comm)
            assert per_peer["mallory"].get(f"dropped_{reason}", 0) >= 1
        assert all(r["swarm_groups_received"] == 4 for r in rows)  # only the honest peer's 4 groups a round
    # The forged member records never replaced the honest ones: both finished under their own names.
    assert "pwned" not in json.dumps(metrics(tmp_path, "ann")[-1]["comm"]["per_peer"])


def one_line_error(p: subprocess.Popen, log: str, timeout: float = 90) -> str:
    rc = p.wait(timeout=timeout)
    assert rc != 0
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    return errors[0]


@pytest.mark.slow
def test_startup_errors_are_one_line(procs, tmp_path):
    boot = start_bootstrap(procs, "boot")
    port = int(re.search(r"/tcp/(\d+)/", boot).group(1))
    # Port taken.
    p = procs.start("dup", [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", str(port),
                            "--identity", "dup.key"])
    assert "already in use" in one_line_error(p, procs.log("dup") if p.wait(timeout=90) is not None else "")
    # Nobody at the bootstrap address.
    dead = re.sub(r"/tcp/\d+/", "/tcp/1/", boot)
    p = procs.start("lost", peer_cmd(tmp_path, "lost", dead, 1))
    p.wait(timeout=90)
    assert "cannot reach any initial peer" in one_line_error(p, procs.log("lost"))
    # The bootstrap's own identity, while it runs.
    p = procs.start("twin", peer_cmd(tmp_path, "twin", boot, 1, "--identity", str(tmp_path / "boot.key")))
    p.wait(timeout=90)
    assert "already used by a running peer" in one_line_error(p, procs.log("twin"))
    # A bootstrap whose clock is 10 s ahead.
    procs.start("skewed", [sys.executable, ACTORS, "skewed", "skewed.key", "10"])
    skewed = procs.wait_for("skewed", r"^(/ip4/\S+)$", 60).group(1)
    p = procs.start("late", peer_cmd(tmp_path, "late", skewed, 1))
    p.wait(timeout=90)
    assert "clock is -10." in one_line_error(p, procs.log("late"))

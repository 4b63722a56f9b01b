"""What the tests share beyond fixtures: the process harness, the command lines that start nodes, and readers
of what nodes write (metrics, events, the shared folder's round clock).

The rules every process test follows (tests/conftest.py holds the fixtures; test modules import from here,
never from each other):
- every process is started in its own session, with its output in <tmp>/<name>.log;
- at the end it is killed with everything it started: its session and its descendants, found through /proc
  (a peer's p2pd, torchrun's ranks);
- every wait is for a condition (a log line, a metrics row, a file, an exit), bounded by a generous timeout
  that only a hang reaches, and its failure shows the log of the process waited for;
- no assertion is about how long something took: a busy machine makes everything slower, not wrong.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
HM_EXP = "hm-test"  # the experiment of the hivemind process tests (test_hivemind, test_bridge, test_tui)
ENDLESS = 10_000  # rounds for a node the test stops or kills itself once it has seen what it needs
# A wait this long means a hang: the slowest step seen on a 2-core machine with two CPU burners beside the
# tests (a node starting, a swarm playing a few rounds) took about 100 s. A test that starts processes
# may take up to PROCESS_TEST_TIMEOUT (pytest-timeout) so that its own waits, which print the log tail of
# what they waited for, run out first.
HANG = 300
PROCESS_TEST_TIMEOUT = 3 * HANG


# ---- command lines ------------------------------------------------------------------------------------------
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pswarm", *args]


def make_settings(tmp_path, **kw):
    from p2pswarm.settings import load_settings

    kw.setdefault("runs_dir", tmp_path / "runs")
    kw.setdefault("eval_every", 0)
    kw.setdefault("comm", "inprocess")  # the hivemind tests start real peers themselves
    return load_settings(**kw)


def sets(*pairs: str) -> list[str]:
    """("a=1", "b=2") -> ["--set", "a=1", "--set", "b=2"]"""
    return [a for s in pairs for a in ("--set", s)]


def node_cmd(out: Path, name: str, rounds: int, *extra: str, experiment: str = HM_EXP) -> list[str]:
    """A headless node on 127.0.0.1 with small rounds (4 tasks, 1 thread, no eval), its run folder `out`."""
    return cli("run", "--headless", "--experiment", experiment, "--node-id", name, "--rounds", str(rounds),
               "--host", "127.0.0.1", "--output-dir", str(out), *sets("eval_every=0", "threads=1", "tasks_per_round=4"),
               *extra)


def peer_cmd(tmp: Path, name: str, boot: str, rounds: int, *extra: str) -> list[str]:
    """A hivemind peer joining through `boot`; its run folder is <tmp>/runs/<name>."""
    return node_cmd(tmp / "runs" / name, name, rounds, "--initial-peers", boot, *sets("collect_timeout=8"), *extra)


def drive_cmd(drive: Path, out: Path, name: str, role: str, rounds: int, *settings: str, experiment: str,
              extra: tuple[str, ...] = ()) -> list[str]:
    """A Drive-mode node on the shared folder `drive` (fast polls, a 4 s heartbeat timeout); `settings` are
    "key=value" pairs. The folder is created here, as a mounted Drive is there: a worker refuses a missing one."""
    Path(drive).mkdir(parents=True, exist_ok=True)
    return node_cmd(out, name, rounds, "--comm", "drive", "--drive-path", str(drive), "--role", role, *extra,
                    *sets("drive_poll_interval=0.1", "drive_peer_timeout=4", *settings), experiment=experiment)


# ---- reading what nodes write ---------------------------------------------------------------------------------
def jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (none if it does not exist; a line still being written is
    left out, so a poll while a node appends never fails)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n") and line.strip()]


def run_folder(where: Any, name: str | None = None) -> Path:
    """A node's run folder: an in-process agent's, <where>/runs/<name> for a process started with
    peer_cmd / --output-dir there, or `where` itself."""
    if hasattr(where, "run_dir"):
        return where.run_dir.path
    return Path(where) / "runs" / name if name is not None else Path(where)


def metrics(where: Any, name: str | None = None) -> list[dict]:
    return jsonl(run_folder(where, name) / "metrics.jsonl")


def by_name(per_peer: dict[str, dict]) -> dict[str, dict]:
    """comm.per_peer rows (keyed by peer id) keyed by the name each row shows (unique: a name two peers
    claim is shown with the tail of each one's peer id)."""
    return {row.get("name", p): row for p, row in per_peer.items()}


def events(where: Any, name: str | None = None) -> list[dict]:
    return jsonl(run_folder(where, name) / "events.jsonl")


def drive_clock(drive: Path, experiment: str) -> int:
    """The round in the shared folder's state/current_state.json (-1 before the coordinator wrote it)."""
    try:
        return json.loads((Path(drive) / "experiments" / experiment / "state" / "current_state.json").read_text())["round"]
    except (FileNotFoundError, ValueError, KeyError):
        return -1


# ---- waiting -------------------------------------------------------------------------------------------------
def until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll `condition` until it holds or `timeout` passes; its last value (for asserts that say more)."""
    end = time.monotonic() + timeout
    while not (ok := condition()) and time.monotonic() < end:
        time.sleep(0.02)
    return ok


def wait_until(cond: Callable[[], Any], timeout: float, what: str, log: Callable[[], str] | None = None,
               poll: float = 0.2) -> Any:
    """Poll `cond` until it returns something true (returned) or `timeout` seconds pass (AssertionError
    naming `what`, with the tail of `log()`)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            tail = log()[-3000:] if log is not None else ""
            raise AssertionError(f"no {what} within {timeout:.0f} s" + (f"; log:\n{tail}" if tail else ""))
        time.sleep(poll)


# ---- processes -----------------------------------------------------------------------------------------------
def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat fields after the command: state, ppid, pgrp, session, ..."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(d.name)
            if st and int(st[1]) == pid:
                out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def session_members(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(d.name)
            if st and int(st[3]) == sid:
                out.append(int(d.name))
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process this test started in its own session, its session and every descendant (torchrun
    starts its ranks in sessions of their own), and reap it."""
    pids = set(session_members(proc.pid))
    if proc.poll() is None:  # once it is reaped its children belong to init: its session still finds them
        pids |= {proc.pid, *descendants(proc.pid)}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def run_process(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kw) in a session of its own, killed with its
    children at the end; an AssertionError with its output if it still runs after `timeout` seconds."""
    proc = subprocess.Popen(cmd, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd[:5]))} ... still running after {timeout:.0f} s:\n"
                             f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}") from None
    finally:
        kill_tree(proc)  # and whatever it left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Procs:
    """Named processes of one test, each in its own session with its output in <tmp>/<name>.log."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.procs: dict[str, subprocess.Popen] = {}
        self._all: list[subprocess.Popen] = []  # a name started again keeps its first process here
        self._logs: list = []

    def start(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed by kill_all
        self._logs.append(log)
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                             cwd=cwd or self.tmp)
        self.procs[name] = p
        self._all.append(p)
        return p

    def __getitem__(self, name: str) -> subprocess.Popen:
        return self.procs[name]

    def log(self, name: str) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` (multiline) in the process's log; fails at once if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log(name), re.M)
            if m:
                return m
            if self.procs[name].poll() is not None:
                m = re.search(pattern, self.log(name), re.M)  # it may have written the line just before exiting
                if m:
                    return m
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}) without {pattern!r}; "
                                     f"log:\n{self.log(name)[-3000:]}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name}: no {pattern!r} within {timeout:.0f} s; log:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def peer_id(self, name: str, timeout: float = HANG) -> str:
        """The peer id a node prints when it starts (`node NAME (peer ID) starting at round R ...`)."""
        return self.wait_for(name, r"\(peer (\w+)\)", timeout).group(1)

    def wait_exit(self, name: str, timeout: float, rc: int | None = 0) -> int:
        """Its exit status (asserted to be `rc` unless None), failing with its log if it still runs after
        `timeout` seconds."""
        try:
            got = self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:.0f} s; log:\n{self.log(name)[-3000:]}") from None
        if rc is not None:
            assert got == rc, f"{name} exited with {got}; log:\n{self.log(name)[-3000:]}"
        return got

    def stop(self, name: str, timeout: float = HANG) -> None:
        """SIGTERM (a node stops after its current step and saves a checkpoint), then a clean exit."""
        self.procs[name].send_signal(signal.SIGTERM)
        self.wait_exit(name, timeout)

    def kill_all(self) -> None:
        for p in self._all:
            kill_tree(p)
        for f in self._logs:
            f.close()


def start_bootstrap(procs: Procs, name: str = "boot", *extra: str) -> str:
    """A bootstrap peer of HM_EXP on 127.0.0.1 (a free port, identity <name>.key); its first multiaddr."""
    procs.start(name, [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity",
                       f"{name}.key", "--experiment", HM_EXP, "--status-every", "2", *extra])
    return procs.wait_for(name, r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", HANG).group(1)

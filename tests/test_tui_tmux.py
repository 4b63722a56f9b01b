"""A real terminal: tmux runs `p2pswarm demo` at 80x24; the captured screen must show the panels with real
values; the quit key must stop the swarm gracefully (checkpoints written) and end the process."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
# On a developer machine without tmux the test is skipped; in CI (CI is set) a missing tmux is a failure.
pytestmark = pytest.mark.skipif(TMUX is None and not os.environ.get("CI"),
                                reason="tmux is not installed (apt-get install tmux)")


def test_demo_in_a_real_80x24_terminal(tmp_path):
    assert TMUX, "tmux is required in CI: apt-get install -y tmux"
    socket = f"p2pswarm-test-{os.getpid()}"  # a tmux server of our own, whatever else runs on the machine
    session = "demo"
    runs, code_file = tmp_path / "runs", tmp_path / "exit_code"

    def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([TMUX, "-L", socket, *args], capture_output=True, text=True, timeout=20, check=check)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session, check=False).stdout

    demo = [sys.executable, "-m", "p2pswarm", "demo", "--agents", "3", "--set", f"runs_dir={runs}",
            "--set", "eval_every=0"]
    command = f"{shlex.join(demo)}; echo $? > {shlex.quote(str(code_file))}"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TMUX", None)
    try:
        subprocess.run([TMUX, "-L", socket, "-f", "/dev/null", "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                        command], env=env, check=True, timeout=20)
        tmux("set-option", "-t", session, "remain-on-exit", "on")

        deadline, text = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            text = screen()
            rounds = [int(r) for r in re.findall(r"round (\d+) ·", text)]
            if rounds and rounds[0] >= 1 and re.search(r"\b[01]\.\d{3}\b", text) and "training · round" in text:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the dashboard never showed a round > 0 with rewards:\n{text}")
        # the demo is a bootstrap peer and hivemind peers on this machine: mode dht
        for panel in ("peers", "rewards", "training", "swarm demo", "mode dht", "shared/recv"):
            assert panel in text, f"{panel!r} missing from the screen:\n{text}"
        assert "loss" in text and "tokens/s" in text
        assert len(text.splitlines()) <= 24 and max(len(l) for l in text.splitlines()) <= 80

        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not code_file.exists():
            time.sleep(0.5)
        assert code_file.exists(), f"the process did not exit after q:\n{screen()}"
        assert code_file.read_text().strip() == "0", screen()
        assert "last checkpoint:" in screen()  # printed on the restored terminal
        nodes = list((runs / "demo").iterdir())
        checkpoints = [p for p in runs.glob("demo/*/checkpoints/round_*/state.json")]
        assert len({p.parents[2] for p in checkpoints}) == 3, (nodes, checkpoints)
    finally:
        subprocess.run([TMUX, "-L", socket, "kill-server"], capture_output=True, timeout=20)
        sock = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / socket
        sock.unlink(missing_ok=True)

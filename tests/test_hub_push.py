"""Hugging Face Hub push, the failure path, with a real node process: a hub that cannot be reached (a closed
port on 127.0.0.1) or that answers 500 to everything costs one warning line, the node plays all its rounds
and stops cleanly (its last checkpoint tried once more), and the token appears in no log and no file.
The same node has PORT, HOST, ROUNDS and DEVICE=gpu in its environment, set for other programs: they do
not change its settings."""

import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import HANG, PROCESS_TEST_TIMEOUT, cli, metrics, sets

pytestmark = pytest.mark.timeout(PROCESS_TEST_TIMEOUT)

TOKEN = "hf_p2pswarmTestToken0123456789abcdef"
ROUNDS = 5  # checkpoints after rounds 1 and 3 (pushes due), the last one after round 4 (pushed at the stop)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RefusingHub(ThreadingHTTPServer):
    """Answers 500 to every request (once `gate` is set, if it has one); keeps the path and Authorization
    header of each."""

    def __init__(self, gate: threading.Event | None = None):
        self.auth: list[str] = []
        self.paths: list[str] = []
        self.gate = gate
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self):
                hub.auth.append(self.headers.get("Authorization", ""))
                hub.paths.append(f"{self.command} {self.path}")
                if hub.gate is not None:
                    hub.gate.wait(HANG)
                body = b'{"error": "internal error"}'
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _refuse

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(params=["unreachable", "refusing"])
def hub(request):
    if request.param == "unreachable":
        yield f"http://127.0.0.1:{closed_port()}", None
        return
    server = RefusingHub()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def test_a_failing_hub_is_one_warning_and_training_goes_on(procs, tmp_path, hub):
    endpoint, server = hub
    out = tmp_path / "node"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "P2PSWARM_"))}
    env.update(HF_ENDPOINT=endpoint, HUGGINGFACE_ACCESS_TOKEN=TOKEN,
               PORT="8080", HOST="example.org", ROUNDS="1", DEVICE="gpu")  # set for other programs
    procs.start("node", cli("run", "--headless", "--comm", "inprocess", "--rounds", str(ROUNDS), "--output-dir", str(out),
                            *sets("eval_every=0", "threads=1", "tasks_per_round=4", "checkpoint_every=2",
                                  "hub_push_every=2")), env=env)
    procs.wait_exit("node", HANG)
    log = procs.log("node")

    assert [m["round"] for m in metrics(out)] == list(range(ROUNDS)), log
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "could not push the policy to the Hugging Face Hub" in warnings[0], log
    assert "pushing the last checkpoint (round 4)" in log
    if server is not None:  # the pushes reached the hub with the token (huggingface_hub's own requests have none)
        pushes = [a for path, a in zip(server.paths, server.auth) if "whoami" in path]
        assert pushes and all(a == f"Bearer {TOKEN}" for a in pushes), server.paths
    assert TOKEN not in log
    for p in Path(tmp_path).rglob("*"):
        if p.is_file() and p != tmp_path / "node.log":
            assert TOKEN.encode() not in p.read_bytes(), p
    assert not (out / ".hub-push").exists()  # the staged copies are gone


def test_a_push_still_running_skips_the_next_one_and_the_last_checkpoint_waits(tmp_path, monkeypatch, caplog):
    """In-process, against a hub that holds each request until the test lets it answer 500."""
    import huggingface_hub.constants

    from helpers import wait_until
    from p2pswarm import events as ev
    from p2pswarm.hub import attach_hub_push
    from p2pswarm.run import RunDir
    from p2pswarm.settings import load_settings

    release = threading.Event()
    server = RefusingHub(gate=release)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    run = RunDir(tmp_path / "run")

    def checkpoint(r: int) -> str:
        model = run.checkpoint_path(r) / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        return str(model.parent)

    def whoamis() -> int:
        return sum("whoami" in p for p in server.paths)

    bus = ev.EventBus("peer")
    attach_hub_push(load_settings(hub_token=TOKEN, hub_push_every=2), run, bus, "n1")
    try:
        with caplog.at_level("INFO"):
            bus.emit(ev.CHECKPOINT_SAVED, round=1, path=checkpoint(1))  # due: pushed
            wait_until(lambda: whoamis() == 1, HANG, "the first push at the hub")
            bus.emit(ev.CHECKPOINT_SAVED, round=3, path=checkpoint(3))  # due, but the first still runs: skipped
            assert "push of round 1 is still running: round 3 is not pushed" in caplog.text
            release.set()
            bus.emit(ev.NODE_STOPPED, round=3, clean=True)  # the last checkpoint: pushed, waited for
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert whoamis() == 2, server.paths
    assert "pushing the last checkpoint (round 3)" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert TOKEN not in caplog.text

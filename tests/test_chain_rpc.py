"""The chain client against hostile or broken JSON-RPC endpoints: real HTTP servers on 127.0.0.1 (started and
stopped by each test) that nest a reply 400k deep, drip it a byte at a time, send more than the client
should read, or answer currentRound with 2**31 - 1. The client's calls end in a ChainError within their
deadline, the process survives, and the coordinator's clock adopts no implausible round."""

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("web3", reason="the chain tests need web3[tester] (the dev extra)")

from eth_account import Account  # noqa: E402
from eth_utils import function_signature_to_4byte_selector  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from p2pswarm.comm.chain.client import ChainClient, ChainError, connect  # noqa: E402
from p2pswarm.comm.chain.coordinator import ChainCoordinator  # noqa: E402
from p2pswarm.comm.chain.rpc import MAX_DEPTH, BoundedHTTPProvider, RPCError, bounded_web3, nesting_ok  # noqa: E402
from p2pswarm.identity import Identity  # noqa: E402

HANG = 120  # seconds: a wait this long means the call hangs (every bounded call here ends in a few)
CONTRACT = "0x" + "11" * 20
HOSTILE = 2**31 - 1
SELECTORS = {function_signature_to_4byte_selector(sig).hex(): name for sig, name in [
    ("currentRound()", "currentRound"), ("currentStage()", "currentStage"), ("stageDuration()", "stageDuration"),
    ("stageCount()", "stageCount"), ("stageDeadline()", "stageDeadline"),
    ("isRegistered(string,address)", "isRegistered"), ("registrationCount()", "registrationCount")]}


def word(v: int) -> str:
    return "0x" + v.to_bytes(32, "big").hex()


class FakeChain:
    """A JSON-RPC endpoint on 127.0.0.1 that speaks just enough of a chain with our contract for a ChainClient
    and a ChainCoordinator (chain id, code, the contract's views, the latest block), and misbehaves as told:
    `hostile(method) -> None | (mode, body)` picks, per request, an answer of its own: mode "send" (the body
    as it is), "drip" (a byte every `drip_s`, without end when body is None) or "stream" (body repeated
    without end). `rounds` are currentRound's answers in turn (the last one repeats)."""

    def __init__(self, rounds=(5,), duration=30, hostile=None, drip_s=0.2):
        self.rounds, self.duration, self.hostile, self.drip_s = list(rounds), duration, hostile, drip_s
        self.calls: list[str] = []
        self.sent: list[int] = []  # bytes of each hostile body written before the client went away
        self.stop = threading.Event()
        chain = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chain.calls.append(req["method"] if isinstance(req, dict) else "batch")
                special = chain.hostile and chain.hostile(req["method"])
                if special:
                    return chain.misbehave(self, *special)
                body = json.dumps({"jsonrpc": "2.0", "id": req["id"], **chain.answer(req)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, req) -> dict:
        method, params = req["method"], req.get("params") or []
        if method == "eth_chainId":
            return {"result": "0x7a69"}
        if method == "eth_getCode":
            return {"result": "0x6000"}
        if method == "eth_getBlockByNumber":
            return {"result": {"number": "0x10", "timestamp": hex(int(time.time())), "hash": "0x" + "ab" * 32,
                               "parentHash": "0x" + "cd" * 32, "transactions": []}}
        if method == "eth_call":
            data = params[0].get("data") or params[0].get("input") or "0x"
            fn = SELECTORS.get(data[2:10])
            if fn == "currentRound":
                return {"result": word(self.rounds.pop(0) if len(self.rounds) > 1 else self.rounds[0])}
            if fn is not None:
                return {"result": word({"currentStage": 0, "stageDuration": self.duration, "stageCount": 1,
                                        "stageDeadline": int(time.time()) + 10**6, "isRegistered": 1,
                                        "registrationCount": 0}[fn])}
        return {"error": {"code": -32601, "message": f"not served here: {method}"}}

    def misbehave(self, handler, mode, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if mode == "stream":
            handler.send_header("Transfer-Encoding", "chunked")
        elif body is not None:
            handler.send_header("Content-Length", str(len(body)))
        else:  # no length: the reply ends when the connection does
            handler.send_header("Connection", "close")
        handler.end_headers()
        sent = 0
        try:
            if mode == "send":
                handler.wfile.write(body)
                sent = len(body)
            elif mode == "drip":
                for i in range(len(body)) if body is not None else iter(int, 1):
                    if self.stop.is_set():
                        break
                    handler.wfile.write(body[i:i + 1] if body is not None else b" ")
                    handler.wfile.flush()
                    sent += 1
                    time.sleep(self.drip_s)
            else:  # stream: chunked, without end
                while not self.stop.is_set():
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
                    sent += len(body)
        except OSError:  # the client went away: what it should do
            pass
        self.sent.append(sent)
        handler.close_connection = True

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(**kw) -> FakeChain:
        servers.append(FakeChain(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def in_thread(fn):
    """Run fn on a thread: (thread, box) with box["result"] or box["error"] once it ends."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def deep(method):
    return "send", b'{"jsonrpc":"2.0","id":0,"result":' + b"[" * 400_000


# ---- (i) a reply nested 400k deep: dropped before json sees it (a segfault before the fix) ---------------------
def test_a_deeply_nested_reply_is_an_error_not_a_crash(fake, tmp_path):
    everything = fake(hostile=deep)
    only_rounds = fake(hostile=lambda m: deep(m) if m == "eth_call" and rounds_now[0] else None)
    rounds_now = [False]

    script = textwrap.dedent("""
        import sys
        from eth_account import Account
        from web3 import HTTPProvider, Web3
        from p2pswarm.comm.chain.client import ChainClient, ChainError, connect
        print("recursion limit", sys.getrecursionlimit())  # py_ecc's: json would recurse until the C stack ends
        url, key = sys.argv[1], sys.argv[2]
        for build in (lambda: connect(url, "%s", key),  # the node's path
                      lambda: ChainClient(Web3(HTTPProvider(url)), "%s", Account.create())):  # `chain status`'s
            try:
                build()
                print("no error")
            except ChainError as e:
                print("error:", e)
    """ % (CONTRACT, CONTRACT))
    out = subprocess.run([sys.executable, "-c", script, everything.url, str(tmp_path / "k")], capture_output=True,
                         text=True, timeout=HANG)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"  # -11 (SIGSEGV) before the fix
    lines = out.stdout.splitlines()
    assert int(lines[0].split()[-1]) >= 100_000  # the condition that made json crash the process
    assert len(lines) == 3 and all(line.startswith("error: cannot reach the chain") for line in lines[1:]), lines
    assert all("nested deeper than 64" in line for line in lines[1:])

    # Mid-run, in this process: a node whose reads come back nested keeps its clock and says why.
    client = connect(only_rounds.url, CONTRACT, tmp_path / "k2")
    coord = ChainCoordinator(client, Identity.generate(), poll=0.05)
    assert coord.start_round(0) == 5
    rounds_now[0] = True
    assert coord.current() == 5
    assert "nested deeper than 64" in coord.status().error
    assert client.w3.provider.dropped["too_deep"] >= 2


# ---- (ii) a reply dripped a byte at a time: the call ends at its deadline ---------------------------------------
def test_a_dripped_reply_ends_at_the_calls_deadline(fake, tmp_path, monkeypatch):
    from p2pswarm.comm.chain import rpc

    monkeypatch.setattr(rpc, "CALL_DEADLINE", 1.0)
    endless = fake(hostile=lambda m: ("drip", None))  # a reply that never ends, a byte every 0.2 s
    for build in (lambda: connect(endless.url, CONTRACT, tmp_path / "k"),
                  lambda: ChainClient(__import__("web3").Web3(__import__("web3").HTTPProvider(endless.url)), CONTRACT,
                                      Account.create())):
        t, box = in_thread(build)
        t.join(HANG)
        assert not t.is_alive(), "a dripped reply held the call"  # requests' per-read timeout: held for good
        assert isinstance(box.get("error"), ChainError) and "no complete reply in 1 s" in str(box["error"])
    # A short reply dripped slower than the deadline allows: the same (requests: 40 bytes x 0.2 s each).
    reply = b'{"jsonrpc":"2.0","id":0,"result":"0x7a69"}'
    slow = fake(hostile=lambda m: ("drip", reply) if m == "eth_chainId" else None)
    t, box = in_thread(lambda: connect(slow.url, CONTRACT, tmp_path / "k"))
    t.join(HANG)
    assert not t.is_alive() and "no complete reply in 1 s" in str(box.get("error"))


def test_a_coordinator_waiting_on_a_dripping_chain_stops_when_interrupted(fake, tmp_path, caplog):
    dripping = [False]
    chain = fake(rounds=[5], hostile=lambda m: ("drip", None) if dripping[0] else None)
    client = ChainClient(bounded_web3(chain.url, deadline=1.0), CONTRACT, Account.create())
    coord = ChainCoordinator(client, Identity.generate(), poll=0.05)
    assert coord.start_round(0) == 5
    dripping[0] = True
    with caplog.at_level(logging.WARNING):
        t, box = in_thread(lambda: coord.next_round(5))
        time.sleep(0.2)
        coord.interrupt()
        t.join(HANG)
    assert not t.is_alive() and box.get("result") == 6  # the round after; the chain told nothing new
    assert coord.clock == 5
    assert client.w3.provider.dropped["timeout"] >= 1
    first = [r.getMessage() for r in caplog.records if "chain clock" in r.getMessage()][0]
    assert first.startswith(f"chain clock: currentRound() on {client.address}: the chain at {chain.url}: ")
    assert first.endswith(": no complete reply in 1 s (keeping round 5)")


# ---- (iii) more than the client reads: dropped at the cap, the rest never read ----------------------------------
def test_an_oversized_reply_is_dropped_at_the_cap(fake, tmp_path):
    big = b'{"jsonrpc":"2.0","id":0,"result":"0x' + b"00" * (3 * 1024 * 1024) + b'"}'  # 6 MiB, valid JSON
    declared = fake(hostile=lambda m: ("send", big))  # Content-Length says it all
    endless = fake(hostile=lambda m: ("stream", b" " * 65536))  # chunked, without end
    for chain in (declared, endless):
        t, box = in_thread(lambda: connect(chain.url, CONTRACT, tmp_path / "k"))
        t.join(HANG)
        assert not t.is_alive(), "an endless reply was read without end"
        assert isinstance(box.get("error"), ChainError) and "4194304" in str(box["error"]), box
    provider = BoundedHTTPProvider(endless.url)
    with pytest.raises(RPCError) as e:
        provider.make_request("eth_chainId", [])
    assert e.value.reason == "too_large" and provider.dropped == {"too_large": 1}
    # the stream's writer saw the client go away after about the cap (its socket buffers hold a few MB more)
    wait = time.monotonic() + HANG
    while len(endless.sent) < 2 and time.monotonic() < wait:
        time.sleep(0.05)
    assert len(endless.sent) == 2 and max(endless.sent) < 64 * 1024 * 1024


# ---- (iv) a currentRound of 2**31 - 1, then honest readings -----------------------------------------------------
def test_one_implausible_round_is_not_adopted_and_the_clock_goes_on(fake, tmp_path, caplog):
    chain = fake(rounds=[5, 5, HOSTILE, 5, HOSTILE, 5, 6])
    client = connect(chain.url, CONTRACT, tmp_path / "k")
    coord = ChainCoordinator(client, Identity.generate(), poll=0.05)
    assert coord.start_round(0) == 5
    with caplog.at_level(logging.INFO, logger="p2pswarm.comm.chain.coordinator"):
        t, box = in_thread(lambda: coord.next_round(5))
        t.join(HANG)
    assert not t.is_alive() and box.get("result") == 6  # not 2**31 - 1, nor stuck waiting for the chain to get there
    assert coord.clock == 6 and coord.suspect_readings == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"read round {HOSTILE}" in warnings[0] and "not adopted" in warnings[0]
    assert coord.status().round == 6


def test_an_implausible_first_reading_is_not_adopted(fake, tmp_path):
    chain = fake(rounds=[HOSTILE, 5, 5])
    coord = ChainCoordinator(connect(chain.url, CONTRACT, tmp_path / "k"), Identity.generate(), poll=0.05)
    assert coord.start_round(2) == 5 and coord.clock == 5


def test_readings_that_never_agree_leave_the_node_on_its_own_round(fake, tmp_path, caplog):
    chain = fake(rounds=[HOSTILE, 5] * 10)
    coord = ChainCoordinator(connect(chain.url, CONTRACT, tmp_path / "k"), Identity.generate(), poll=0.05)
    with caplog.at_level(logging.WARNING):
        assert coord.start_round(2) == 2 and coord.clock == -1
    assert "did not agree" in caplog.text


def test_a_node_far_behind_catches_up_once_a_second_reading_confirms_the_jump(fake, tmp_path, caplog):
    # Rounds of at least 30 s (stageDuration): 500 rounds in a poll is no honest move from round 5, but a
    # node that was cut off for hours sees exactly that. The same reading twice: adopted.
    chain = fake(rounds=[5, 5, 500, 500], duration=30)
    coord = ChainCoordinator(connect(chain.url, CONTRACT, tmp_path / "k"), Identity.generate(), poll=0.05)
    assert coord.start_round(0) == 5
    with caplog.at_level(logging.INFO, logger="p2pswarm.comm.chain.coordinator"):
        t, box = in_thread(lambda: coord.next_round(5))
        t.join(HANG)
    assert box.get("result") == 500 and coord.clock == 500 and coord.suspect_readings == 1
    assert "round 500 confirmed by a second reading (from round 5)" in caplog.text
    # A move the contract allows in the time that passed is adopted at once: 2 rounds of >= 30 s in 60 s slack.
    chain.rounds[:] = [502]
    assert coord.next_round(500) == 502 and coord.suspect_readings == 1


def test_a_round_the_chain_never_reaches_does_not_hold_the_node_for_good(fake, tmp_path, monkeypatch, caplog):
    # A plausible reading (3 rounds in a poll, with rounds of 0 s: no bound but a second per round) that the
    # chain then never reaches: the chain reads below the node's clock, and next_round waits a bounded time.
    from p2pswarm.comm.chain import coordinator

    monkeypatch.setattr(coordinator, "BEHIND_WAIT", 0.5)
    chain = fake(rounds=[5, 5, 8, 5], duration=0)
    coord = ChainCoordinator(connect(chain.url, CONTRACT, tmp_path / "k"), Identity.generate(), poll=0.05)
    assert coord.start_round(0) == 5 and coord.next_round(5) == 8
    with caplog.at_level(logging.WARNING):
        t, box = in_thread(lambda: coord.next_round(8))
        t.join(HANG)
    assert not t.is_alive() and box.get("result") == 9 and coord.clock == 8
    assert "the chain has read round 5, below this node's round 8" in caplog.text


def test_an_honest_in_process_chain_that_ran_many_rounds_ahead_is_followed(tmp_path):
    """The same on a real EVM: the chain advances 70 rounds (a burst of blocks, each a second later in chain
    time) while a node reads it; the node follows it within two readings."""
    from p2pswarm.comm.chain.local import LocalChain

    chain = LocalChain.inprocess(stage_seconds=1)
    client = chain.client(Account.create())
    coord = ChainCoordinator(client, Identity.generate(), poll=0.05)
    assert coord.start_round(0) == 0
    for _ in range(70):  # the contract's owner, as fast as blocks come: each block is a chain second later
        tx = client.contract.functions.updateStageAndRound().transact({"from": chain.dev})
        assert chain.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    assert client.round() == (70, 0)
    assert coord.current() in (0, 70)  # suspect (70 rounds of 1 s, past 60 s of slack): kept; or adopted
    assert coord.current() == 70


# ---- the depth check itself -------------------------------------------------------------------------------------
def depth(x) -> int:
    if isinstance(x, (list, dict)):
        return 1 + max((depth(v) for v in (x.values() if isinstance(x, dict) else x)), default=0)
    return 0


TRICKY = st.lists(st.sampled_from(['"', "\\", "[", "]", "{", "}", '\\"', "\\\\", "a", "é"]), max_size=5).map("".join)
JSON = st.recursive(st.none() | st.integers() | TRICKY,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
                    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(JSON, st.integers(1, 8), st.booleans())
def test_nesting_ok_measures_the_depth_json_would_recurse_to(doc, limit, ascii_only):
    body = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert nesting_ok(body, limit) == (depth(doc) <= limit)


def test_nesting_ok_refuses_malformed_and_pathological_bodies():
    assert nesting_ok(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) and not nesting_ok(b"[" * 65 + b"]" * 65)
    assert not nesting_ok(b'"' + b"[" * 10)  # an unterminated string
    assert not nesting_ok(b'[1, "\\"]')  # the quote is escaped: the string does not end
    assert nesting_ok(b'["\\\\"]')  # an escaped backslash, then the end of the string
    assert not nesting_ok(b'"' * (1 << 19))  # more quotes and brackets than any reply the client reads


def test_a_port_with_nothing_listening_is_one_error_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ChainError) as e:
        connect(f"http://127.0.0.1:{port}", CONTRACT, tmp_path / "k")
    assert "\n" not in str(e.value) and "Connection refused" in str(e.value)

"""The chain clock against anvil over HTTP: the same client and errors as in-process, `p2pswarm chain
status`, nodes in separate processes following the chain's rounds, and the bootstrap peer serving anvil
(`--chain local`) to hivemind peers. CI installs anvil (.ci/run)."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("web3", reason="the chain tests need web3[tester] (the dev extra)")
if shutil.which("anvil") is None:
    pytest.skip("anvil is not installed (npm install -g @foundry-rs/anvil); CI has it", allow_module_level=True)

from eth_account import Account  # noqa: E402
from helpers import (ENDLESS, HANG, PROCESS_TEST_TIMEOUT, alive, children, cli, drive_cmd, metrics, peer_cmd,  # noqa: E402
                     sets, start_bootstrap, wait_until)

from p2pswarm.comm.chain.client import ChainClient, ChainError  # noqa: E402
from p2pswarm.comm.chain.local import LocalChain, anvil_executable, serve_anvil  # noqa: E402
from p2pswarm.identity import Identity  # noqa: E402


@pytest.fixture(scope="module")
def anvil():
    chain = LocalChain.anvil(stage_seconds=1)
    yield chain
    chain.close()


def test_http_reverts_decode_by_selector_and_status_lists_proofs(anvil):
    client = anvil.client(Account.create(), contract=anvil.deploy(1))
    me = Identity.generate()
    assert client.register(me) is True
    assert client.register(me) is False
    with pytest.raises(ChainError, match="PeerIdAlreadyRegistered"):
        client.transact("registerPeer", me.peer_id)
    client.transact("registerPeer", Identity.generate().peer_id)  # a claim with no proof
    out = subprocess.run(cli("chain", "status", "--rpc", anvil.url, "--contract", client.address), capture_output=True,
                         text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    assert "round 0, stage 0" in out.stdout
    assert f"{me.peer_id[-8:]}  {client.eoa}  proof ok" in out.stdout
    assert "proof absent" in out.stdout


def test_status_of_an_unreachable_chain_is_one_error_line():
    out = subprocess.run(cli("chain", "status", "--rpc", "http://127.0.0.1:9", "--contract", "0x" + "11" * 20),
                         capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "cannot reach the chain at http://127.0.0.1:9" in out.stderr


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_nodes_in_separate_processes_follow_the_chains_rounds(anvil, tmp_path):
    contract = anvil.deploy(1)
    drive = tmp_path / "drive"
    chain = sets(f"chain={anvil.url}", f"chain_contract={contract}", "chain_id=31337", "chain_poll=0.2")
    procs = [subprocess.Popen(drive_cmd(drive, tmp_path / n, n, "worker", 3, *[], experiment="chain-proc", extra=tuple(chain)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=HANG)
        assert p.returncode == 0, err[-2000:]
    client = anvil.client(Account.create(), contract=contract)
    assert client.round()[0] >= 2
    assert sum(r.proven for r in client.registrations()) == 2
    for n in ("a", "b"):
        assert [r["round"] for r in metrics(tmp_path / n)] == [0, 1, 2]


# ---- the bootstrap peer's --chain local --------------------------------------------------------------------------
SETTINGS = r"follow its rounds with: (--set chain=(\S+) --set chain_contract=(\S+) --set chain_id=(\d+))$"


def anvil_child(pid: int) -> int:
    """The anvil process among `pid`'s children (the binary itself, not npm's Node launcher)."""
    def find():
        return next((c for c in children(pid) if Path(f"/proc/{c}/comm").read_text().strip() == "anvil"), None)
    return wait_until(find, 30, "an anvil child process")


def reader(url: str, contract: str) -> ChainClient:
    from web3 import HTTPProvider, Web3

    return ChainClient(Web3(HTTPProvider(url)), contract, Account.create(), where=url)


def test_anvil_found_behind_npms_launcher_is_the_binary():
    exe = anvil_executable()
    assert exe is not None and not exe.endswith((".js", ".mjs"))
    assert Path(exe).read_bytes()[:4] == b"\x7fELF" or sys.platform != "linux"


def test_a_recorded_chain_still_up_is_reused_else_a_new_one_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="p2pswarm.comm.chain.local")
    state = tmp_path / "chain-x.json"
    first = serve_anvil(state, stage_seconds=1)
    try:
        again = serve_anvil(state, stage_seconds=1)
        assert (again.url, again.contract, again.process) == (first.url, first.contract, None)
        assert "reusing the local chain at " + first.url in caplog.text
        again.close()  # not its anvil: left running
        assert first.process.poll() is None
    finally:
        first.close()
    renewed = serve_anvil(state, stage_seconds=1)
    try:  # the recorded port was free again: the peers' settings still hold
        assert (renewed.url, renewed.contract) == (first.url, first.contract)
        assert "started a NEW chain" in caplog.text
    finally:
        renewed.close()


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_bootstraps_anvil_dies_with_it_when_killed_or_stopped(procs, tmp_path):
    start_bootstrap(procs, "boot", "--chain", "local", "--chain-round-seconds", "1")
    url = procs.wait_for("boot", SETTINGS, HANG).group(2)
    anvil = anvil_child(procs["boot"].pid)
    procs["boot"].send_signal(signal.SIGKILL)  # the bootstrap alone: anvil is in its session, not signalled
    procs["boot"].wait(timeout=30)
    wait_until(lambda: not alive(anvil), 30, "anvil's exit after its bootstrap was killed")
    # Restarted with its state dir, it says the chain is new, on the same URL the peers were given.
    start_bootstrap(procs, "boot2", "--chain", "local", "--chain-round-seconds", "1", "--identity", "boot.key")
    procs.wait_for("boot2", rf"started a NEW chain at {re.escape(url)} ", HANG)
    assert procs.wait_for("boot2", SETTINGS, HANG).group(2) == url
    anvil = anvil_child(procs["boot2"].pid)
    procs.stop("boot2")
    wait_until(lambda: not alive(anvil), 30, "anvil's exit after its bootstrap stopped")


def test_bootstrap_without_anvil_is_one_error_line_naming_it(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity",
                          str(tmp_path / "b.key"), "--chain", "local"], capture_output=True, text=True, env=env,
                         timeout=HANG)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "needs anvil" in out.stderr and "npm install -g @foundry-rs/anvil" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_peers_follow_the_bootstraps_chain_and_a_killed_one_resumes_at_its_round(procs, tmp_path):
    """Three hivemind peers on the chain a bootstrap serves; bob is killed, the chain and the others go on,
    and bob restarted resumes at the chain's round (logging the rounds he skipped), never going back."""
    boot = start_bootstrap(procs, "boot", "--chain", "local", "--chain-round-seconds", "1")
    got = procs.wait_for("boot", SETTINGS, HANG)
    chain = reader(got.group(2), got.group(3))
    common = (*got.group(1).split(), *sets("chain_poll=0.2", "checkpoint_every=1", "collect_timeout=4"))
    names = ("ann", "bob", "cat")
    for n in names:
        procs.start(n, peer_cmd(tmp_path, n, boot, ENDLESS, *common))
    both = lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in names)  # noqa: E731
    wait_until(lambda: all(len(metrics(tmp_path, n)) >= 2 for n in names), HANG, "two rounds played by each", both)
    # Every peer's key was funded from the dev account, so each registered with its proof.
    assert sum(r.proven for r in chain.registrations()) == 3
    bob_run = tmp_path / "runs" / "bob"
    wait_until(lambda: (bob_run / "checkpoints").exists() and any((bob_run / "checkpoints").glob("round_*")), HANG,
               "a checkpoint of bob's", lambda: procs.log("bob"))
    procs["bob"].send_signal(signal.SIGKILL)
    procs["bob"].wait(timeout=30)
    before = [r["round"] for r in metrics(tmp_path, "bob")]
    killed_at = chain.round()[0]
    # The others and the chain go on without him.
    wait_until(lambda: chain.round()[0] >= killed_at + 2
               and all(max(r["round"] for r in metrics(tmp_path, n)) > killed_at for n in ("ann", "cat")),
               HANG, "two chain rounds and a round of ann's and cat's after bob died", both)
    behind = chain.round()[0]
    procs.start("bob2", peer_cmd(tmp_path, "bob", boot, ENDLESS, *common))
    start = int(procs.wait_for("bob2", r"starting at round (\d+)", HANG).group(1))
    m = procs.wait_for("bob2", r"following the chain's rounds .* chain round (\d+), starting at round (\d+)", HANG)
    assert int(m.group(2)) >= behind and int(m.group(2)) == max(int(m.group(1)), start)
    procs.wait_for("bob2", r"skipped round\(s\) \[", HANG)  # the rounds the chain went on without him
    wait_until(lambda: len([r for r in metrics(tmp_path, "bob") if r["round"] >= behind]) >= 2, HANG,
               "two rounds of bob's after his restart", lambda: procs.log("bob2"))
    rounds = [r["round"] for r in metrics(tmp_path, "bob")]
    assert rounds == sorted(set(rounds)), rounds  # never back, no round twice
    assert [r for r in rounds if r >= behind][0] >= int(m.group(2))  # resumed at the chain's round
    assert rounds[:len(before)] == before or rounds[:len(before) - 1] == before[:-1]  # his history kept
    assert sum(r.proven for r in chain.registrations()) == 3  # bob found himself registered

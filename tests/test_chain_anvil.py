"""The chain clock against anvil over HTTP: the same client and errors as in-process, `p2pswarm chain
status`, and nodes in separate processes following the chain's rounds. CI installs anvil (.ci/run)."""

import shutil
import subprocess

import pytest

pytest.importorskip("web3", reason="the chain tests need web3[tester] (the dev extra)")
if shutil.which("anvil") is None:
    pytest.skip("anvil is not installed (npm install -g @foundry-rs/anvil); CI has it", allow_module_level=True)

from eth_account import Account  # noqa: E402
from helpers import HANG, PROCESS_TEST_TIMEOUT, cli, drive_cmd, metrics, sets  # noqa: E402

from p2pswarm.comm.chain.client import ChainError  # noqa: E402
from p2pswarm.comm.chain.local import LocalChain  # noqa: E402
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

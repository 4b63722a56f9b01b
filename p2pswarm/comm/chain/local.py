"""Local chains for trying the chain clock (`--chain local`) and for tests: an in-process EVM shared by
the agents of one process, or anvil on 127.0.0.1 for separate processes. Both deploy a contract with a
funded development account and fund each node's own key from it, so a user needs no tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from p2pswarm.comm.chain.client import ChainClient, ChainError, artifact

log = logging.getLogger(__name__)

FUNDING = 10**20  # wei given to each node's key on a local chain (100 ether: gas for years of rounds)
ANVIL_INSTALL = "npm install -g @foundry-rs/anvil (or Foundry's foundryup)"


def tester_provider():
    """An in-process EVM provider (eth-tester + py-evm) that is safe to share between agent threads, and
    whose clock moves: a dev chain only mines when a transaction comes, so its time would stand still and
    no stage deadline would ever pass. Before each request, an empty block is mined when the latest block
    has been the latest for a second of wall time. (eth-tester stamps each block at least a second after
    its parent, so a burst of transactions runs chain time ahead of the wall clock: comparing the two
    would stall it until the wall clock caught up.)"""
    from web3 import EthereumTesterProvider

    class LockedTesterProvider(EthereumTesterProvider):
        def __init__(self) -> None:
            super().__init__()
            self._lock = threading.RLock()
            self._latest = (-1, 0.0)  # (block number, monotonic time it was first seen as the latest)

        def make_request(self, method, params):  # type: ignore[override]
            with self._lock:
                number = self.ethereum_tester.get_block_by_number("latest")["number"]
                now = time.monotonic()
                if number != self._latest[0]:
                    self._latest = (number, now)
                elif now - self._latest[1] >= 1:
                    self.ethereum_tester.mine_blocks(1)
                    self._latest = (number + 1, now)
                return super().make_request(method, params)

    return LockedTesterProvider()


class LocalChain:
    """A local chain with our contract deployed: `w3`, `contract` (its address), `url` (anvil's, else None).

    `client(account, identity)` funds `account` and returns its ChainClient. close() stops anvil if this
    object started it (`process`); a chain attached to with `contract` given is deployed to already.
    """

    def __init__(self, w3, *, stage_seconds: float, url: str | None = None, process=None, flavour: str = "p2pswarm",
                 contract: str | None = None):
        self.w3, self.url, self.process, self.flavour = w3, url, process, flavour
        self.dev = w3.eth.accounts[0]  # both chains hold unlocked, funded development accounts
        self.contract = contract or self.deploy(stage_seconds)

    @classmethod
    def inprocess(cls, stage_seconds: float = 30.0, flavour: str = "p2pswarm") -> LocalChain:
        from web3 import Web3

        return cls(Web3(tester_provider()), stage_seconds=stage_seconds, flavour=flavour)

    @classmethod
    def anvil(cls, stage_seconds: float = 30.0, port: int = 0, chain_id: int = 31337) -> LocalChain:
        """Start anvil on 127.0.0.1 (a free port when 0) and deploy; ChainError naming what to install if absent.

        anvil dies with this process, also when it is killed (Linux: the parent-death signal, which the kernel
        sends when the thread that started anvil ends: call this from a thread that lives as long as the
        chain, such as the main thread)."""
        from p2pswarm.comm.chain.rpc import bounded_web3

        exe = anvil_executable()
        if exe is None:
            raise ChainError(f"--chain local for separate processes needs anvil, which is not installed: {ANVIL_INSTALL}")
        port = port or _free_port()
        # A block every second: a chain that only mines on transactions keeps its time still, and no stage
        # deadline would pass while the nodes wait for one.
        proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--chain-id", str(chain_id),
                                 "--block-time", "1", "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_die_with_parent())
        url = f"http://127.0.0.1:{port}"
        w3 = bounded_web3(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                w3.eth.chain_id
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace")[-300:] if proc.poll() is not None else "no answer in 30 s"
                    proc.kill()
                    raise ChainError(f"anvil did not start on {url}: {err.strip()}") from None
                time.sleep(0.05)
        try:
            return cls(w3, stage_seconds=stage_seconds, url=url, process=proc)
        except BaseException:
            proc.kill()
            raise

    def _mined(self, txhash) -> dict:
        receipt = self.w3.eth.wait_for_transaction_receipt(txhash, timeout=60)
        if receipt["status"] != 1:
            raise ChainError("a local chain transaction of the development account reverted")
        return receipt

    def deploy(self, stage_seconds: float = 30.0) -> str:
        """Deploy a fresh contract of this chain's flavour; its address. Gensyn's is initialized with the
        development account as owner and stage manager."""
        abi, code = artifact(self.flavour)
        factory = self.w3.eth.contract(abi=abi, bytecode=code)
        args = (max(1, round(stage_seconds)), 1) if self.flavour == "p2pswarm" else ()
        address = self._mined(factory.constructor(*args).transact({"from": self.dev}))["contractAddress"]
        if self.flavour != "p2pswarm":
            c = self.w3.eth.contract(address=address, abi=abi)
            self._mined(c.functions.initialize(self.dev).transact({"from": self.dev}))
        return address

    def fund(self, address: str, wei: int = FUNDING) -> None:
        if self.w3.eth.get_balance(address) >= wei // 2:
            return
        self._mined(self.w3.eth.send_transaction({"from": self.dev, "to": address, "value": wei}))

    def client(self, account, *, contract: str | None = None) -> ChainClient:
        self.fund(account.address)
        return ChainClient(self.w3, contract or self.contract, account, flavour=self.flavour,
                           where=self.url and f"the chain at {self.url}" or "the in-process chain")

    def reader(self) -> ChainClient:
        """A client for reads: a throwaway key, not funded (a read costs nothing)."""
        from eth_account import Account

        return ChainClient(self.w3, self.contract, Account.create(), flavour=self.flavour,
                           where=self.url and f"the chain at {self.url}" or "the in-process chain")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def anvil_executable() -> str | None:
    """anvil's binary on PATH, None if absent. npm's @foundry-rs/anvil puts a Node launcher on PATH that
    spawns the binary: that binary is returned instead, since a launcher killed with SIGKILL (ours, or the
    parent-death signal) would leave the binary running, holding its port."""
    exe = shutil.which("anvil")
    if exe is None:
        return None
    real = Path(exe).resolve()
    if real.suffix in (".mjs", ".js"):
        pkg = real.parent  # .../@foundry-rs/anvil; the platform's package sits beside it or inside it
        for cand in [*sorted(pkg.glob("node_modules/@foundry-rs/anvil-*/bin/anvil")),
                     *sorted(pkg.parent.glob("anvil-*/bin/anvil")), pkg / "dist" / "anvil"]:
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return exe


def _die_with_parent():
    """A preexec_fn making the child die (SIGKILL) when the thread that started it ends, however it ends:
    a killed bootstrap must not leave its chain running. Linux only (prctl); elsewhere None, and only a
    clean stop ends the child."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above: nobody would signal us
            os._exit(1)

    return set_pdeathsig


def serve_anvil(state_file: Path, stage_seconds: float = 30.0, port: int = 0) -> LocalChain:
    """The local chain of a bootstrap peer (`--chain local`), its URL, contract and chain id kept in
    `state_file`. The recorded chain is reused when it still answers with our contract (its rounds and
    registrations go on; this process did not start it and leaves it running at close()); otherwise anvil
    is started, on the recorded port when it is free (the URL peers were given stays valid; the contract
    address, the development account's first deployment, too), and the log says the chain is new."""
    try:
        from p2pswarm.comm.chain.rpc import bounded_web3
    except ImportError:  # an optional extra: one line naming it, not a traceback
        raise ChainError("--chain local needs web3, which is not installed: pip install 'p2pswarm[chain]'") from None

    rec = _read_record(state_file)
    if rec is not None:
        w3 = bounded_web3(rec["url"], deadline=3)
        try:
            if w3.eth.chain_id == rec["chain_id"] and len(w3.eth.get_code(rec["contract"])) > 0:
                chain = LocalChain(w3, stage_seconds=stage_seconds, url=rec["url"], contract=rec["contract"])
                round_ = chain.reader().round()[0]
                log.info("reusing the local chain at %s (contract %s, round %d): its anvil is still up; it was not "
                         "started by this bootstrap and keeps running when it stops", rec["url"], rec["contract"], round_)
                return chain
        except Exception:  # noqa: BLE001 - gone, or something else on the port: start a chain of our own
            pass
    want = port or (rec["port"] if rec is not None and _port_free(rec["port"]) else 0)
    chain = LocalChain.anvil(stage_seconds=stage_seconds, port=want)
    chain_id = chain.w3.eth.chain_id
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": chain.url, "port": int(chain.url.rsplit(":", 1)[1]), "contract": chain.contract,
                               "chain_id": chain_id}))
    os.replace(tmp, state_file)
    if rec is None:
        log.info("started a local chain (anvil) at %s: contract %s, rounds of at least %.0f s",
                 chain.url, chain.contract, stage_seconds)
    else:
        same = chain.url == rec["url"] and chain.contract == rec["contract"]
        log.warning("the local chain at %s was gone: started a NEW chain at %s (round 0, no registrations; "
                    "contract %s%s)", rec["url"], chain.url, chain.contract,
                    ", same URL and address: peers keep their settings" if same else
                    ": peers need the new --set lines below")
    return chain


def _read_record(path: Path) -> dict | None:
    """The recorded chain of `path`, None when absent or not one (a file of ours, but checked all the same)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("url"), str) and rec["url"].startswith("http://127.0.0.1:")
          and isinstance(rec.get("port"), int) and 0 < rec["port"] < 65536
          and isinstance(rec.get("chain_id"), int) and isinstance(rec.get("contract"), str)
          and len(rec["contract"]) == 42 and rec["contract"].startswith("0x"))
    return rec if ok else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As anvil binds: the connections of the chain that just stopped linger in TIME_WAIT on the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fund_on_dev_chain(client: ChainClient, url: str) -> None:
    """On a development chain of this machine (anvil on 127.0.0.1: unlocked, funded accounts), fund the
    client's key from the first of them, as `--chain local` does in-process. Nothing on any other chain."""
    from urllib.parse import urlparse

    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return
    try:
        dev = client.w3.eth.accounts
    except Exception:  # noqa: BLE001 - a node that lists no accounts is no dev chain
        return
    if not isinstance(dev, (list, tuple)) or not dev:
        return
    try:
        if client.w3.eth.get_balance(client.eoa) != 0:
            return
        txhash = client.w3.eth.send_transaction({"from": dev[0], "to": client.eoa, "value": FUNDING})
        client.w3.eth.wait_for_transaction_receipt(txhash, timeout=60)
    except Exception as e:  # noqa: BLE001 - whatever the node answered: one line
        raise ChainError(f"funding the chain key {client.eoa} from {url}'s development account failed: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:120]}") from None
    log.info("funded the chain key %s from the local chain's development account", client.eoa)

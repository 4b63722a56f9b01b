"""ChainClient: one account's view of one SwarmCoordinator contract, over web3.

Every transaction goes the same way (`transact`): pre-flighted with eth_call (a revert costs nothing
and is reported before anything is signed), fees and gas from the node, the account's balance checked
against them, signed locally, sent, its receipt waited for and its status checked (a transaction mined
with status 0 is an error, not a success). Reverts become one line naming the contract's custom error,
decoded by its 4-byte selector from the ABI, whichever exception type the provider raised (the
in-process EVM's TransactionFailed, HTTP's ContractCustomError...).

What the chain returns is data from the network: rounds and stages are checked as p2pswarm.validate
integers and peer ids as libp2p ids before anything uses them. Over HTTP every call goes through one
bounded transport (comm/chain/rpc.py: a total deadline per call, a size cap, a nesting-depth check before
parsing), also when the caller built the Web3 object with web3's own HTTPProvider; whatever the transport
or the reply's decoding raises reaches callers as ChainError.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from p2pswarm import validate as V
from p2pswarm.errors import UserError
from p2pswarm.identity import Identity, verify

log = logging.getLogger(__name__)

FLAVOURS = ("p2pswarm", "gensyn-0.4.2")
ARTIFACTS = {"p2pswarm": "SwarmCoordinator_p2pswarm.json", "gensyn-0.4.2": "SwarmCoordinator_0.4.2.json"}
PROOF_DOMAIN = b"p2pswarm chain registration v1"
REWARD_SCALE = 1000  # rewards go on chain as int256 thousandths (Gensyn's contract takes integers)
MAX_REGISTRATIONS = 10_000  # what one status read enumerates at most
RECEIPT_TIMEOUT = 120.0
RECEIPT_POLL = 0.1  # seconds between receipt reads, doubling to 1 s
_ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)


class ChainError(UserError, RuntimeError):
    """A chain operation failed; the message is one line naming what and, where it can, what to do."""


def artifact(flavour: str) -> tuple[list[dict], str]:
    """The shipped ABI and deployment bytecode of a contract flavour."""
    if flavour not in FLAVOURS:
        raise ChainError(f"unknown contract flavour {flavour!r}: one of {', '.join(FLAVOURS)}")
    data = json.loads(resources.files("p2pswarm.comm.chain").joinpath("artifacts", ARTIFACTS[flavour]).read_text())
    code = data["bytecode"]
    return data["abi"], code["object"] if isinstance(code, dict) else code


def error_selectors(abi: list[dict]) -> dict[bytes, str]:
    """4-byte selector -> "Name()" for every custom error of an ABI."""
    from eth_utils import keccak

    out = {}
    for e in abi:
        if e.get("type") == "error":
            sig = f"{e['name']}({','.join(i['type'] for i in e.get('inputs', []))})"
            out[keccak(text=sig)[:4]] = e["name"]
    return out


def revert_data(exc: BaseException) -> bytes | None:
    """The revert payload an exception carries, whichever provider raised it."""
    data = getattr(exc, "data", None)
    if isinstance(data, dict):  # some JSON-RPC errors: {"data": "0x..."}
        data = data.get("data")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str) and re.fullmatch(r"0x[0-9a-fA-F]*", data):
        return bytes.fromhex(data[2:])
    text = str(exc)
    m = re.search(r"execution reverted: (b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\")", text)  # eth-tester
    if m:
        try:
            return ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            return None
    m = re.search(r"0x[0-9a-fA-F]{8,}", text)
    return bytes.fromhex(m.group(0)[2:]) if m else None


def describe_revert(exc: BaseException, errors: dict[bytes, str]) -> str:
    """A revert as a short phrase: the custom error's name, an Error(string) message, or the raw payload."""
    data = revert_data(exc)
    if data and data[:4] in errors:
        return errors[data[:4]]
    if data and data[:4] == _ERROR_STRING:
        from eth_abi import decode

        try:
            return f"Error({decode(['string'], data[4:])[0]!r})"
        except Exception:  # noqa: BLE001 - an undecodable message: show the bytes
            pass
    if data:
        return f"unknown revert 0x{data.hex()[:72]}"
    return V.clip(str(exc), 160)


def proof_message(chain_id: int, contract: str, eoa: str) -> bytes:
    """What a peer signs to bind an Ethereum address to its peer id on one contract of one chain."""
    return PROOF_DOMAIN + chain_id.to_bytes(32, "big") + bytes.fromhex(contract[2:]) + bytes.fromhex(eoa[2:])


def make_proof(identity: Identity, chain_id: int, contract: str, eoa: str) -> bytes:
    return identity.sign(proof_message(chain_id, contract, eoa))


def proof_ok(peer_id: str, proof: bytes, chain_id: int, contract: str, eoa: str) -> bool:
    """Whether `proof` is `peer_id`'s signature binding `eoa` on this contract; never raises."""
    try:
        public = V.public_from_peer_id(V.peer_id(peer_id, "peer id"))
    except (V.Invalid, ValueError):
        return False
    return len(proof) == 64 and verify(public, proof, proof_message(chain_id, contract, eoa))


def load_or_create_key(path: Path):
    """The node's Ethereum account from `path` (a hex private key, mode 0600), created there on first use."""
    from eth_account import Account

    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        account = Account.create()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(account.key.hex() + "\n")
        log.info("created the chain key %s (address %s)", path, account.address)
        return account
    if path.stat().st_mode & 0o077:
        raise ChainError(f"the chain key {path} is readable by others: chmod 600 {path}")
    try:
        return Account.from_key(path.read_text().strip())
    except (ValueError, TypeError) as e:
        raise ChainError(f"{path} is not a hex private key ({e})") from None


@dataclass
class Registration:
    eoa: str
    peer_id: str
    proven: bool


class ChainClient:
    """One account on one SwarmCoordinator, of flavour `p2pswarm` (ours) or `gensyn-0.4.2`.

    Construction checks, each failure one ChainError line: the RPC answers, its chain id is the expected
    one (when given), and there is code at the contract address. A `w3` over web3's HTTPProvider is moved
    onto BoundedHTTPProvider (same URL): no call of this client waits on an unbounded transport. Views
    (`round`, `deadline`, `registrations`, ...) return validated values; the writes (`register`, `advance`,
    `submit_reward`, `submit_winners`) are idempotent: what the contract refuses as already done returns
    False.
    Thread-safe as far as web3 providers are (the in-process one is locked: comm/chain/local.py).
    Setting `stopping` (a threading.Event) ends a wait for a receipt at once, with a ChainError.
    """

    def __init__(self, w3, contract: str, account, *, flavour: str = "p2pswarm", chain_id: int = 0,
                 where: str = "the chain"):
        from web3 import HTTPProvider, Web3

        from p2pswarm.comm.chain.rpc import BoundedHTTPProvider, RPCError

        if type(w3.provider) is HTTPProvider:  # requests: per-read timeouts, no size or depth bound
            w3.provider = BoundedHTTPProvider(str(w3.provider.endpoint_uri))
        self.w3, self.account, self.flavour, self.where = w3, account, flavour, where
        self.stopping = threading.Event()
        self.abi, _ = artifact(flavour)
        self.errors = error_selectors(self.abi)
        try:
            self.chain_id = V.integer(w3.eth.chain_id, "chain id", 1, 2**63)
        except Exception as e:  # noqa: BLE001 - any transport failure reads the same to a user
            why = e.detail if isinstance(e, RPCError) else f"{type(e).__name__}: {V.clip(str(e), 120)}"
            raise ChainError(f"cannot reach {where}: {why} "
                             "(is the node running, and is the chain_rpc URL right?)") from None
        if chain_id and self.chain_id != chain_id:
            raise ChainError(f"{where} is chain id {self.chain_id}, not the expected {chain_id} "
                             "(chain_id): wrong RPC URL or wrong network")
        if not Web3.is_address(contract):
            raise ChainError(f"chain_contract {contract!r} is not an Ethereum address")
        self.address = Web3.to_checksum_address(contract)
        if not self._rpc("eth_getCode", w3.eth.get_code, self.address):
            raise ChainError(f"no contract at {self.address} on chain {self.chain_id} ({where}): "
                             "check chain_contract and the network")
        self.contract = w3.eth.contract(address=self.address, abi=self.abi)

    @property
    def eoa(self) -> str:
        return self.account.address

    def _rpc(self, what: str, fn, *args: Any) -> Any:
        """One plain RPC (no contract call); any failure as one ChainError line."""
        try:
            return fn(*args)
        except ChainError:
            raise
        except Exception as e:  # noqa: BLE001 - provider-specific types and malformed replies; one line
            raise ChainError(f"{what} on {self.where}: {type(e).__name__}: {V.clip(str(e), 120)}") from None

    # ---- reads ---------------------------------------------------------------------------------------
    def view(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.contract.functions, fn)(*args).call()
        except ChainError as e:  # the transport's: no reply, or one dropped
            raise ChainError(f"{fn}() on {self.address}: {e}") from None
        except Exception as e:  # noqa: BLE001 - provider-specific types; one line
            raise ChainError(f"{fn}() on {self.address}: {describe_revert(e, self.errors)}") from None

    def view_first(self, fn: str, *args: Any) -> Any:
        """The first element of an array a view returns (Gensyn's contract answers arrays): ChainError if the
        reply has none, as a hostile or broken endpoint's may."""
        out = self.view(fn, *args)
        if not isinstance(out, (list, tuple)) or not out:
            raise ChainError(f"{fn}() on {self.address} returned no element")
        return out[0]

    def round(self) -> tuple[int, int]:
        """(round, stage), checked: a contract that returns a round past 2**31 cannot move a node there."""
        return (V.integer(self.view("currentRound"), "currentRound", 0),
                V.integer(self.view("currentStage"), "currentStage", 0))

    def deadline(self) -> int | None:
        """When anyone may advance the current stage (chain time), or None: Gensyn's contract has no deadline."""
        if self.flavour != "p2pswarm":
            return None
        return V.integer(self.view("stageDeadline"), "stageDeadline", 0, 2**63)

    def chain_time(self) -> int:
        """The latest block's timestamp, checked."""
        block = self._rpc("eth_getBlockByNumber", self.w3.eth.get_block, "latest")
        try:
            return V.integer(block["timestamp"], "block timestamp", 0, 2**63)
        except (V.Invalid, KeyError, TypeError) as e:
            raise ChainError(f"the latest block from {self.where} has no valid timestamp "
                             f"({V.clip(str(e), 80)})") from None

    def registered(self, peer_id: str) -> bool:
        if self.flavour == "p2pswarm":
            return bool(self.view("isRegistered", peer_id, self.eoa))
        return self.view_first("getEoa", [peer_id]) == self.eoa

    def registrations(self) -> list[Registration]:
        """Every claim the contract holds (ours: enumerable), each with whether its proof verifies here."""
        if self.flavour != "p2pswarm":
            return [Registration(self.eoa, p, False) for p in self._own_gensyn_peer_ids()]
        out = []
        n = min(V.integer(self.view("registrationCount"), "registrationCount", 0, 2**63), MAX_REGISTRATIONS)
        for i in range(n):
            eoa, peer_id, proof = self.view("registration", i)
            out.append(Registration(eoa, peer_id, proof_ok(peer_id, bytes(proof), self.chain_id, self.address, eoa)))
        return out

    def own_registration(self, peer_id: str) -> Registration | None:
        """This account's claim of `peer_id`, with whether its proof verifies here (as a peer would check
        it); None when this account has not claimed it. On ours, the claim is looked for newest first."""
        if not self.registered(peer_id):
            return None
        if self.flavour != "p2pswarm":
            return Registration(self.eoa, peer_id, False)  # Gensyn's contract holds no proofs
        n = min(V.integer(self.view("registrationCount"), "registrationCount", 0, 2**63), MAX_REGISTRATIONS)
        for i in reversed(range(n)):
            eoa, claimed, proof = self.view("registration", i)
            if eoa == self.eoa and claimed == peer_id:
                return Registration(eoa, peer_id, proof_ok(peer_id, bytes(proof), self.chain_id, self.address, eoa))
        return Registration(self.eoa, peer_id, False)  # registered, but past what one read enumerates

    def _own_gensyn_peer_ids(self) -> list[str]:
        return list(self.view_first("getPeerId", [self.eoa]))

    def total_reward(self, peer_id: str, eoa: str) -> float:
        if self.flavour == "p2pswarm":
            return self.view("totalReward", peer_id, eoa) / REWARD_SCALE
        return self.view_first("getTotalRewards", [peer_id]) / REWARD_SCALE

    # ---- writes --------------------------------------------------------------------------------------
    def transact(self, fn: str, *args: Any, already: tuple[str, ...] = ()) -> bool:
        """Send one transaction; True once mined with status 1, False when the pre-flight reverts with one
        of the `already` errors (the thing is done, or not to be done now). ChainError otherwise."""
        call = getattr(self.contract.functions, fn)(*args)
        self._check_funded(fn, 1)
        try:
            call.call({"from": self.eoa})
        except ChainError as e:  # the transport's: no reply, or one dropped; not a revert
            raise ChainError(f"{fn}() on {self.address}: {e}") from None
        except Exception as e:  # noqa: BLE001 - provider-specific types; decoded by selector
            why = describe_revert(e, self.errors)
            if why in already:
                log.debug("%s(): %s", fn, why)
                return False
            raise ChainError(f"{fn}() would revert on {self.address}: {why}") from None
        try:
            tx = call.build_transaction({"from": self.eoa, "nonce": self.w3.eth.get_transaction_count(self.eoa),
                                         "chainId": self.chain_id})
            self._check_funded(fn, tx["gas"] * tx.get("maxFeePerGas", tx.get("gasPrice", 0)))
            txhash = self.w3.eth.send_raw_transaction(self.account.sign_transaction(tx).raw_transaction)
            receipt = self._receipt(fn, txhash)
        except ChainError:
            raise
        except Exception as e:  # noqa: BLE001 - provider-specific types; one line
            why = describe_revert(e, self.errors)
            if why in already:  # another peer got there between the pre-flight and the send
                return False
            raise ChainError(f"{fn}() on {self.address}: {why}") from None
        get = getattr(receipt, "get", None)  # an AttributeDict; anything else from a broken node is no receipt
        if get is None or get("status") != 1:
            raise ChainError(f"{fn}() was mined but reverted (transaction 0x{bytes(txhash).hex()}, "
                             f"block {V.clip(get('blockNumber') if get else None, 20)})")
        return True

    def _receipt(self, fn: str, txhash) -> Any:
        """The receipt of `txhash`, polled until RECEIPT_TIMEOUT; a set `stopping` ends the wait at once."""
        from web3.exceptions import TransactionNotFound

        end = time.monotonic() + RECEIPT_TIMEOUT
        delay = RECEIPT_POLL
        while True:
            try:
                return self.w3.eth.get_transaction_receipt(txhash)
            except TransactionNotFound:
                pass
            if self.stopping.is_set():
                raise ChainError(f"{fn}(): stopped before transaction 0x{bytes(txhash).hex()} was mined "
                                 "(it may still be)")
            if time.monotonic() >= end:
                raise ChainError(f"{fn}(): transaction 0x{bytes(txhash).hex()} not mined in {RECEIPT_TIMEOUT:g} s")
            self.stopping.wait(delay)
            delay = min(delay * 2, 1.0)

    def _check_funded(self, fn: str, need: int) -> None:
        balance = self._rpc("eth_getBalance", self.w3.eth.get_balance, self.eoa)
        if balance < need:
            raise ChainError(f"the chain account {self.eoa} holds {balance} wei on chain {self.chain_id}, "
                             f"{fn}() needs about {need}: fund it (or use --chain local)")

    def register(self, identity: Identity) -> bool:
        """Register this node's peer id with this account, once; True if this call registered it."""
        if self.registered(identity.peer_id):
            return False
        if self.flavour == "p2pswarm":
            proof = make_proof(identity, self.chain_id, self.address, self.eoa)
            done = self.transact("registerPeerWithProof", identity.peer_id, proof, already=("PeerIdAlreadyRegistered",))
        else:
            owner = self.view_first("getEoa", [identity.peer_id])
            if int(owner, 16) != 0:
                raise ChainError(f"peer id {identity.peer_id} is registered to {owner} on {self.address}, "
                                 "not to this node's chain key: Gensyn's contract lets the first claim win")
            done = self.transact("registerPeer", identity.peer_id, already=("PeerIdAlreadyRegistered",))
        if done:
            log.info("registered peer %s as %s on chain %d (contract %s)", identity.peer_id[-8:], self.eoa,
                     self.chain_id, self.address)
        return done

    def advance(self, at: tuple[int, int] | None = None) -> bool:
        """Advance the stage (and round) if the contract lets this account now; False if not yet / not allowed.
        With `at` = the (round, stage) this node read and finished, only while the chain still stands there
        (ours: advanceFrom), so a node that lost the race to another advancer cannot also end the next stage."""
        if at is not None and self.flavour == "p2pswarm":
            return self.transact("advanceFrom", *at, already=("StageNotOver", "StageAlreadyAdvanced"))
        return self.transact("updateStageAndRound", already=("StageNotOver", "OnlyStageManager"))

    def submit_reward(self, round: int, stage: int, reward: float, peer_id: str) -> bool:
        value = int(round_half(reward * REWARD_SCALE))
        return self.transact("submitReward", round, stage, value, peer_id,
                             already=("RewardAlreadySubmitted", "InvalidRoundNumber", "InvalidStageNumber"))

    def submit_winners(self, round: int, winners: list[str], peer_id: str) -> bool:
        return self.transact("submitWinners", round, winners, peer_id,
                             already=("WinnerAlreadyVoted", "InvalidRoundNumber"))


def round_half(x: float) -> float:
    return float(int(x + (0.5 if x >= 0 else -0.5)))


def connect(url: str, contract: str, key_path: Path, *, flavour: str = "p2pswarm", chain_id: int = 0) -> ChainClient:
    """A client over HTTP(S) JSON-RPC at `url`."""
    from p2pswarm.comm.chain.rpc import bounded_web3

    if not url.startswith(("http://", "https://")):
        raise ChainError(f"chain_rpc {url!r} is not an http(s):// JSON-RPC URL")
    w3 = bounded_web3(url)
    return ChainClient(w3, contract, load_or_create_key(key_path), flavour=flavour, chain_id=chain_id,
                       where=f"the chain at {url}")

"""The round clock on a SwarmCoordinator contract (docs/chain.md).

    SwarmCoordinator.vy   our contract: Gensyn's 0.4.2 names, permissionless advancement, proven claims
    build.py              compiles it into artifacts/ (development time only; nodes need no compiler)
    artifacts/            our ABI + bytecode, and Gensyn's shipped SwarmCoordinator_0.4.2.json (MIT)
    client.py             ChainClient: pre-flighted, receipted transactions; reverts decoded by selector
    coordinator.py        ChainCoordinator: the Coordinator that follows and advances the chain's round
    local.py              local chains: the in-process EVM, anvil (and the one a bootstrap peer serves)

make_coordinator() builds the chain clock a node's settings ask for.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from p2pswarm.identity import Identity

log = logging.getLogger(__name__)

_local_lock = threading.Lock()
_local: dict[str, object] = {}  # experiment -> LocalChain shared by the agents of this process


def local_chain(experiment: str, stage_seconds: float):
    """The in-process chain of `experiment` in this process, started (and the contract deployed) on first use."""
    from p2pswarm.comm.chain.local import LocalChain

    with _local_lock:
        if experiment not in _local:
            _local[experiment] = chain = LocalChain.inprocess(stage_seconds=stage_seconds)
            log.info("in-process chain started: contract %s, rounds of at least %.0f s", chain.contract, stage_seconds)
        return _local[experiment]


def make_coordinator(settings, identity: Identity, run_path: Path):
    """The ChainCoordinator of `settings.chain`: 'local' (the in-process chain of this process) or an RPC URL."""
    from p2pswarm.comm.chain.client import connect, load_or_create_key
    from p2pswarm.comm.chain.coordinator import ChainCoordinator

    key_path = settings.chain_key_path or Path(run_path) / "chain.key"
    if settings.chain == "local":
        client = local_chain(settings.experiment, settings.chain_round_seconds).client(load_or_create_key(key_path))
    else:
        from p2pswarm.comm.chain.local import fund_on_dev_chain

        client = connect(settings.chain, settings.chain_contract, key_path, flavour=settings.chain_abi,
                         chain_id=settings.chain_id)
        fund_on_dev_chain(client, settings.chain)  # `p2pswarm chain local`'s anvil: no tokens to find
    return ChainCoordinator(client, identity, poll=settings.chain_poll, submit_rewards=settings.chain_submit_rewards,
                            winners=settings.chain_submit_rewards)

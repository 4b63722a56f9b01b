"""The swarm over hivemind (the default transport): `connect()` assembles a node's comm and round clock.

    node.py         the libp2p daemon (GossipSub on) + DHT in this process; start-up checks with one-line errors
    redial.py       re-dialling lost and initial peers (and a bootstrap's book of them), so the swarm heals
    pubsub.py       our binding for the daemon's pubsub: publish, subscribe (a kept reader), topic peers
    gossip.py       the swarm's topic: heartbeats, announcements, the clock; caps per author; catch-up
    records.py      the fields of members, announcements and the clock, checked; the DHT's record validator
    payloads.py     rollout payloads pulled peer to peer over a stream, size-capped
    manager.py      HivemindComm: publish / collect from K sampled announcers / counters
    coordinator.py  the round clock: a keeper peer, followers, or a time clock
    bootstrap.py    BootstrapPeer: a DHT node with no model that peers join through (the `bootstrap` app runs one)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from p2pswarm.identity import Identity

if TYPE_CHECKING:
    from p2pswarm.comm.hivemind.coordinator import DHTCoordinator
    from p2pswarm.comm.hivemind.manager import HivemindComm
    from p2pswarm.settings import Settings

log = logging.getLogger(__name__)


def net_config(settings: Settings, initial_peers: list[str] | None = None):
    from p2pswarm.comm.hivemind.node import NetConfig

    return NetConfig(initial_peers=list(settings.initial_peers if initial_peers is None else initial_peers),
                     host=settings.host, port=settings.port, announce_maddrs=list(settings.announce_maddrs),
                     client_mode=settings.client_mode, use_relay=settings.use_relay,
                     use_auto_relay=settings.use_auto_relay, max_clock_skew=settings.max_clock_skew)


def connect(settings: Settings, identity: Identity, key_path: str | Path, *, name: str, state_dir: Path | None,
            initial_peers: list[str] | None = None, port: int | None = None) -> tuple[HivemindComm, DHTCoordinator]:
    """Start this node's p2p peer and join (or start) the swarm; StartupError names the cause in one line."""
    from p2pswarm.comm.hivemind.coordinator import DHTCoordinator, RoundKeeper
    from p2pswarm.comm.hivemind.manager import HivemindComm
    from p2pswarm.comm.hivemind.node import HivemindNode, peer_id_of

    net = net_config(settings, initial_peers)
    if port is not None:
        net.port = port
    node = HivemindNode(identity, key_path, net).start()
    try:
        comm = HivemindComm(node, settings.experiment, name=name, timeout=settings.collect_timeout,
                            want_peers=settings.collect_peers, sample_peers=settings.sample_peers,
                            inline=settings.gossip_inline)
        keeper = None
        if settings.role == "coordinator" or not net.initial_peers:
            keeper = RoundKeeper(comm, state_dir / "round_clock.json" if state_dir else None,
                                 quorum=settings.collect_peers, deadline=settings.round_deadline,
                                 fraction=settings.quorum_fraction, log_rounds=False,
                                 shard_size=settings.gossip_shard_size)
    except BaseException:
        node.close()
        raise
    if not net.initial_peers:
        log.info("started a new swarm; others join it with --initial-peers %s", " ".join(node.maddrs) or "(client mode: none)")
    trusted = {settings.coordinator_peer} if settings.coordinator_peer else {peer_id_of(m) for m in net.initial_peers}
    coordinator = DHTCoordinator(comm, trusted=trusted, keeper=keeper, round_seconds=settings.round_seconds,
                                 genesis=settings.genesis, hold=settings.round_deadline + settings.collect_timeout)
    comm.add_close_callback(coordinator.close)
    return comm, coordinator

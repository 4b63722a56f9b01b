"""A bootstrap peer: a full DHT node with a stable peer id and no model. Peers join the swarm through it;
with `coordinator=True` it also keeps the round clock (persisted in `state_dir`); with `chain="local"` it
serves a local chain (anvil on 127.0.0.1, our contract deployed: docs/chain.md) for the peers' chain clock."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from p2pswarm.comm.hivemind import net_config
from p2pswarm.comm.hivemind.coordinator import RoundKeeper
from p2pswarm.comm.hivemind.manager import HivemindComm
from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig
from p2pswarm.errors import UserError
from p2pswarm.identity import Identity

log = logging.getLogger("p2pswarm.bootstrap")


class BootstrapPeer:
    def __init__(self, identity_path: Path, net: NetConfig, *, experiment: str, coordinator: bool = False,
                 state_dir: Path | None = None, quorum: int = 0, deadline: float = 300.0, fraction: float = 0.75,
                 chain: str | None = None, shard_size: int = 32,
                 chain_round_seconds: float = 30.0, chain_port: int = 0):
        if chain not in (None, "local"):
            raise UserError(f"the bootstrap peer serves only --chain local (anvil on this machine), not {chain!r}: "
                            "peers of a chain elsewhere point at it themselves (--set chain=URL)")
        self.chain_mode, self.chain_round_seconds, self.chain_port = chain, chain_round_seconds, chain_port
        self.chain = None  # the LocalChain served, once started
        self.identity_path = Path(identity_path)
        self.net = net
        self.experiment = experiment
        self.coordinator = coordinator
        self.state_dir = Path(state_dir) if state_dir else self.identity_path.parent
        self.quorum = quorum
        self.deadline = deadline
        self.fraction = fraction
        self.shard_size = shard_size
        self.identity = Identity.load_or_create(self.identity_path)
        self.node = self.comm = self.keeper = None
        self.started = time.time()

    @classmethod
    def from_settings(cls, settings, identity_path: Path, *, state_dir: Path | None = None, coordinator: bool = True,
                      host: str | None = None) -> BootstrapPeer:
        net = net_config(settings)
        if host is not None:
            net = replace(net, host=host, client_mode=False)
        return cls(identity_path, net, experiment=settings.experiment, coordinator=coordinator, state_dir=state_dir,
                   quorum=settings.collect_peers, deadline=settings.round_deadline, fraction=settings.quorum_fraction,
                   shard_size=settings.gossip_shard_size)

    def start(self) -> BootstrapPeer:
        return self.start_node().start_services()

    def start_node(self) -> BootstrapPeer:
        """The p2p node alone (and the local chain): their addresses are known from here on."""
        if self.chain_mode == "local":
            # Before the node's threads: anvil is started with a preexec_fn (comm/chain/local.py).
            from p2pswarm.comm.chain.local import serve_anvil

            self.chain = serve_anvil(self.state_dir / f"chain-{self.experiment}.json", self.chain_round_seconds,
                                     self.chain_port)
        # The peers it met survive a restart (redial.py): a restarted bootstrap dials them instead of
        # waiting, alone with a stopped clock, for peers that dial their initial peers only once.
        net = replace(self.net, known_peers=self.net.known_peers or str(self.state_dir / "known_peers.json"))
        try:
            self.node = HivemindNode(self.identity, self.identity_path, net).start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def chain_settings(self) -> str:
        """What a peer adds to follow the served chain's rounds ('' without one)."""
        if self.chain is None:
            return ""
        return (f"--set chain={self.chain.url} --set chain_contract={self.chain.contract} "
                f"--set chain_id={self.chain.w3.eth.chain_id}")

    def start_services(self) -> BootstrapPeer:
        """Membership, and the round clock with coordinator=True."""
        try:
            self.comm = HivemindComm(self.node, self.experiment, name="bootstrap", role="bootstrap")
            if self.coordinator:
                self.keeper = RoundKeeper(self.comm, self.state_dir / f"round_clock-{self.experiment}.json",
                                          quorum=self.quorum, deadline=self.deadline, fraction=self.fraction,
                                          shard_size=self.shard_size)
        except BaseException:
            self.node.close()
            raise
        return self

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def maddrs(self) -> list[str]:
        return self.node.maddrs if self.node else []

    def status(self) -> dict:
        """Peers connected at the libp2p level, trainers in the experiment (heard on the topic), and the round."""
        members = self.node.call(self.comm.fetch_members(), timeout=10)
        connected = self.node.call(self.node.p2p.list_peers(), timeout=10)
        trainers = [m for m in members.values() if m.role == "trainer"]
        shards, listened = self.comm.shards, self.comm.listened_shards if self.comm.all_shards else self.comm.shards
        heard = sum(1 for m in trainers if self.comm.in_my_shard(m.peer_id))  # past 16 shards, a sample of them
        return {"peers_connected": len(connected), "trainers": heard * shards // max(1, listened), "topic_shards": shards,
                "round": self.keeper.round if self.keeper else max((m.round for m in trainers), default=-1),
                "uptime_s": round(time.time() - self.started),
                "dropped": sum(v for k, v in self.comm.counters().items() if k.startswith("dropped_") and isinstance(v, int)),
                # trainers that held a round to its deadline, not waited for now (comm/core.py RoundRule)
                "not_waited_for": sum(1 for until in self.keeper.rule.excused_until.values() if self.keeper.round < until)
                if self.keeper else 0,
                "chain_round": self._chain_round()}

    def _chain_round(self) -> int | None:
        if self.chain is None:
            return None
        try:
            return self.chain.reader().round()[0]
        except Exception as e:  # noqa: BLE001 - shown in the status line, not raised
            log.warning("local chain: %s", e)
            return None

    def status_line(self) -> str:
        s = self.status()
        return (f"status: {s['peers_connected']} peer(s) connected, {s['trainers']} trainer(s) in "
                f"'{self.experiment}'" + (f" in {s['topic_shards']} topic shards" if s["topic_shards"] > 1 else "")
                + f", round {s['round']}" + (" (coordinator)" if self.keeper else "")
                + (f", {s['dropped']} bad record(s)/payload(s) dropped" if s["dropped"] else "")
                + (f", {s['not_waited_for']} stalling trainer(s) not waited for" if s["not_waited_for"] else "")
                + (f", chain round {s['chain_round']}" if s["chain_round"] is not None else ""))

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
        if self.comm is not None:
            self.comm.close()
        elif self.node is not None:
            self.node.close()
        if self.chain is not None:
            self.chain.close()
            self.chain = None

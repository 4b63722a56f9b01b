"""`p2pswarm-bootstrap` (also `p2pswarm bootstrap`): run a headless bootstrap peer until SIGTERM / Ctrl-C."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def serve(host: str = "0.0.0.0", port: int = 38331, identity: Path = Path("bootstrap.key"),
          initial_peers: list[str] | None = None, announce_maddrs: list[str] | None = None,
          coordinator: bool = False, experiment: str = "default", state_dir: Optional[Path] = None,
          status_every: float = 60.0, quorum: int = 0, round_deadline: float = 300.0, chain: str | None = None,
          chain_round_seconds: float = 30.0, chain_port: int = 0, quorum_fraction: float = 0.75,
          shard_size: int = 32) -> None:
    from p2pswarm.comm.hivemind.bootstrap import BootstrapPeer
    from p2pswarm.comm.hivemind.node import NetConfig
    from p2pswarm.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    log = logging.getLogger("p2pswarm.bootstrap")
    net = NetConfig(initial_peers=list(initial_peers or []), host=host, port=port,
                    announce_maddrs=list(announce_maddrs or []))
    try:  # this app's one catch: a bad identity file, a port in use, an unreachable peer: one line, exit 1
        peer = BootstrapPeer(identity, net, experiment=experiment, coordinator=coordinator, state_dir=state_dir,
                             quorum=quorum, deadline=round_deadline, fraction=quorum_fraction, chain=chain, chain_round_seconds=chain_round_seconds,
                             chain_port=chain_port, shard_size=shard_size).start_node()
        for m in peer.maddrs:  # the first lines: what operators hand out
            print(m, flush=True)
        if peer.chain is not None:
            log.info("local chain: RPC %s, contract %s, chain id %d; peers on this machine follow its rounds with: %s",
                     peer.chain.url, peer.chain.contract, peer.chain.w3.eth.chain_id, peer.chain_settings)
        peer.start_services()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    log.info("bootstrap peer %s (identity %s) is up; peers join with --initial-peers %s",
             peer.peer_id, identity, peer.maddrs[0] if peer.maddrs else "")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("stopping (%s)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop.wait(status_every):
            try:
                log.info(peer.status_line())
            except Exception as e:  # noqa: BLE001 - a status hiccup is not a reason to stop serving
                log.warning("status: %s", e)
    finally:
        peer.close()
        log.info("stopped")


@app.command()
def main_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port (keep it fixed: peers' initial-peers name it)")] = 38331,
    identity: Annotated[Path, typer.Option(help="identity key file (created 0600 on first run; keeps the peer id)")] = Path("bootstrap.key"),
    initial_peers: Annotated[Optional[list[str]], typer.Option("--initial-peers", help="other bootstrap peers to link up with (repeatable)")] = None,
    announce_maddrs: Annotated[Optional[list[str]], typer.Option("--announce-maddrs", help="multiaddrs to announce (public address behind port forwarding)")] = None,
    coordinator: Annotated[bool, typer.Option("--coordinator", help="also keep the experiment's round clock")] = False,
    experiment: Annotated[str, typer.Option(envvar="EXPERIMENT_NAME", help="experiment whose clock to keep and peers to count")] = "default",
    state_dir: Annotated[Optional[Path], typer.Option(help="where the round clock persists (default: beside the identity)")] = None,
    status_every: Annotated[float, typer.Option(help="seconds between status lines")] = 60.0,
    quorum: Annotated[int, typer.Option(help="--coordinator: advance when this many trainers finished (0: quorum-fraction)")] = 0,
    quorum_fraction: Annotated[float, typer.Option(min=0.01, max=1.0, help="--coordinator: advance when this share of the trainers that played the last round finished")] = 0.75,
    round_deadline: Annotated[float, typer.Option(help="--coordinator: advance this long after the first trainer finished")] = 300.0,
    shard_size: Annotated[int, typer.Option(min=0, help="--coordinator: split the topic into shards of at most this many trainers (0: one topic)")] = 32,
    chain: Annotated[Optional[str], typer.Option(help="'local': serve a chain for the peers' round clock (anvil on 127.0.0.1, docs/chain.md)")] = None,
    chain_round_seconds: Annotated[float, typer.Option(help="--chain local: the contract's stage duration (the shortest round)")] = 30.0,
    chain_port: Annotated[int, typer.Option(help="--chain local: anvil's port (0: the one it had before, else any free)")] = 0,
) -> None:
    """Run a headless bootstrap peer: prints its multiaddrs first, logs a status line every minute,
    keeps its peer id across restarts, stops cleanly on SIGTERM."""
    serve(host, port, identity, initial_peers, announce_maddrs, coordinator, experiment, state_dir, status_every,
          quorum, round_deadline, chain, chain_round_seconds, chain_port, quorum_fraction, shard_size)


def main() -> None:
    app()

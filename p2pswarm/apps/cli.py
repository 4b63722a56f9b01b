"""The `p2pswarm` command (console script `p2pswarm`, `python -m p2pswarm`).

Every command's `UserError` is caught once, in `_Commands.invoke`: one `error:` line on stderr, no
traceback, exit 1 (2 for a bad setting, a usage error as click's own). Anything else keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

# `p2pswarm bootstrap` is `p2pswarm-bootstrap`: one definition of its options (bootstrap/cli.py).
from bootstrap.cli import main_command as _bootstrap  # light: typer only, the rest loads lazily
from p2pswarm.errors import UserError
from p2pswarm.settings import Settings, SettingsError, load_settings


class _Commands(TyperGroup):
    """The commands, with the one place a `UserError` becomes an `error:` line and an exit status."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2 if isinstance(e, SettingsError) else 1) from None


app = typer.Typer(
    cls=_Commands,
    help="p2pswarm: a peer-to-peer reinforcement-learning swarm for language models (GRPO + SAPO).\n\n"
    "Without a command it opens the terminal UI (as `p2pswarm tui`).",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("p2pswarm")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = value
    return out


def _values(sets: list[str], flags: dict, defaults: dict | None = None) -> dict:
    """defaults < --set < flags (an explicit flag wins over --set); config and environment sit below."""
    values = dict(defaults or {})
    values.update(_parse_sets(sets))
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def _settings(config: Optional[Path], sets: list[str], **flags) -> Settings:
    return load_settings(config, **_values(sets, flags))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML settings file")]
SetOpt = Annotated[list[str], typer.Option("--set", help="any setting as KEY=VALUE (repeatable)")]


def _settings_factory(config: Optional[Path], sets: list[str], defaults: dict | None = None, **flags):
    """For the UI: `factory(**overrides)` -> Settings, the join screen's choices on top of the command line.
    Checked once here, so a bad value stops the program before the UI opens, naming the setting."""
    base = _values(sets, flags, defaults)
    load_settings(config, **base)

    def factory(**overrides) -> Settings:
        return load_settings(config, **{**base, **overrides})

    return factory


def _open_tui(factory, *, autostart: bool, rounds: Optional[int] = None) -> None:
    """Run the terminal UI; afterwards say where the node's output and last checkpoint are."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tui import SwarmApp

    outcome = SwarmApp(factory, autostart=autostart, rounds=rounds).run()
    if outcome is None:
        return
    if outcome.run_dir:
        typer.echo(f"output in {outcome.run_dir}")
    if outcome.checkpoint:
        typer.echo(f"last checkpoint: {outcome.checkpoint}")
    if outcome.forced:
        typer.echo("left without waiting for the node to stop")
    if outcome.error:
        _fail(outcome.error, 1)


@app.callback(invoke_without_command=True)
def _no_command(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        tui()


@app.command()
def tui(
    config: ConfigOpt = None,
    sets: SetOpt = [],  # noqa: B006
    model: Annotated[Optional[str], typer.Option(help="prefills the join screen's model")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="prefills the experiment / swarm name")] = None,
    node_id: Annotated[Optional[str], typer.Option(help="prefills the node name")] = None,
    agents: Annotated[Optional[int], typer.Option(help="prefills the local agents")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="stop when this many rounds are done")] = None,
) -> None:
    """Open the terminal UI: join a swarm (or start a local one) and watch it learn."""
    factory = _settings_factory(config, sets, model=model, experiment=experiment, node_id=node_id, agents=agents)
    _open_tui(factory, autostart=False, rounds=rounds)


@app.command()
def demo(
    agents: Annotated[int, typer.Option(help="local agents in the swarm", min=1, max=64)] = 4,
    rounds: Annotated[Optional[int], typer.Option(help="stop when this many rounds are done")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = [],  # noqa: B006
) -> None:
    """A whole swarm on this machine with nothing to configure: N local agents, the UI on one of them."""
    factory = _settings_factory(config, sets, defaults={"experiment": "demo"}, agents=agents)
    _open_tui(factory, autostart=True, rounds=rounds)


@app.command()
def run(
    config: ConfigOpt = None,
    sets: SetOpt = [],  # noqa: B006 - typer needs a literal default
    headless: Annotated[bool, typer.Option("--headless", help="console output only, no terminal UI")] = False,
    model: Annotated[Optional[str], typer.Option(help="'embedded', a local folder or a hub name")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="experiment / swarm name")] = None,
    node_id: Annotated[Optional[str], typer.Option(help="node name (default: derived from the peer id)")] = None,
    identity: Annotated[Optional[Path], typer.Option(help="identity key file (created if missing)")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="stop when this many rounds are done")] = None,
    agents: Annotated[Optional[int], typer.Option(help="agents in this process (in-process swarm)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="reasoning-gym preset or file")] = None,
    game: Annotated[Optional[str], typer.Option(help="what the swarm plays; 'help' lists the games")] = None,
    data: Annotated[Optional[Path], typer.Option(help="game=text: the question/answer file or saved datasets folder")] = None,
    comm: Annotated[Optional[str], typer.Option(help="hivemind (default), inprocess, torch (one agent per torchrun rank), drive (a shared folder), auto (DHT, else drive) or hybrid (both, bridged)")] = None,
    initial_peers: Annotated[Optional[list[str]], typer.Option("--initial-peers", help="multiaddr of a peer to join (repeatable; INITIAL_PEERS); none: start a new swarm")] = None,
    host: Annotated[Optional[str], typer.Option(help="comm=hivemind: address to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="comm=hivemind: TCP port (0: any free)")] = None,
    client_mode: Annotated[Optional[bool], typer.Option("--client-mode/--no-client-mode", help="comm=hivemind: behind NAT, only dial out")] = None,
    announce_maddrs: Annotated[Optional[list[str]], typer.Option("--announce-maddrs", help="comm=hivemind: multiaddrs others should dial (repeatable)")] = None,
    drive_path: Annotated[Optional[str], typer.Option("--drive-path", help="comm=drive: the shared folder or fsspec URL (GDRIVE_PATH)")] = None,
    role: Annotated[Optional[str], typer.Option(help="comm=drive: worker, or coordinator (keeps the round clock; NODE_ROLE)")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="default runs/<experiment>/<node>")] = None,
    num_generations: Annotated[Optional[int], typer.Option("--num-generations", "-G", help="completions per task")] = None,
    local_groups: Annotated[Optional[int], typer.Option("--local-groups", "-I", help="local groups per update")] = None,
    swarm_groups: Annotated[Optional[int], typer.Option("--swarm-groups", "-J", help="swarm groups per update")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option()] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", "--learning-rate")] = None,
    loss_type: Annotated[Optional[str], typer.Option(help="grpo, dr_grpo or dapo")] = None,
    beta: Annotated[Optional[float], typer.Option(help="KL weight")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="rounds between checkpoints")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = None,
) -> None:
    """Run a node: train the policy round after round and share rollouts with the swarm."""
    if (game or _parse_sets(sets).get("game")) == "help":
        from p2pswarm.data import games_listing

        typer.echo(games_listing())
        return
    flags = dict(
        model=model, experiment=experiment, node_id=node_id, identity_path=identity, rounds=rounds,
        agents=agents, preset=preset, game=game, data_path=data, comm=comm, initial_peers=initial_peers or None, host=host, port=port,
        client_mode=client_mode, announce_maddrs=announce_maddrs or None, drive_path=drive_path, role=role, device=device, dtype=dtype, seed=seed, output_dir=output_dir,
        num_generations=num_generations, local_groups=local_groups, swarm_groups=swarm_groups,
        max_new_tokens=max_new_tokens, learning_rate=learning_rate, loss_type=loss_type, beta=beta,
        checkpoint_every=checkpoint_every, log_level=log_level,
    )
    s = _settings(config, sets, **flags)
    if not headless and s.comm != "torch" and sys.stdin.isatty() and sys.stdout.isatty():  # a terminal: the UI
        _open_tui(_settings_factory(config, sets, **flags), autostart=True, rounds=s.rounds)
        return
    _setup_logging(s.log_level)
    from p2pswarm.comm.torchdist import env_rank
    from p2pswarm.headless import ConsolePrinter
    from p2pswarm.node import build_swarm, run_agents

    agents_ = build_swarm(s)
    # One progress bar per terminal: none with several agents, none on torchrun ranks other than 0.
    single_bar = len(agents_) == 1 and (s.comm != "torch" or env_rank() == 0)
    for a in agents_:
        a.events.subscribe(ConsolePrinter(a.name, show_name=len(agents_) > 1, progress_bar=None if single_bar else False))
        log.info("%s: output in %s", a.name, a.run_dir.path)

    def stop(signum, _frame):
        log.info("stopping after the current step (again to abort)")
        for a in agents_:
            a.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        run_agents(agents_, s.rounds)
    except KeyboardInterrupt:
        _fail("aborted", 130)
    except UserError:  # a rank that stopped answering, say: the one catch in _Commands says it
        raise
    except Exception as e:  # already logged with its traceback by run_agents
        _fail(f"{type(e).__name__}: {e}", 1)


app.command("bootstrap", help="Run a headless bootstrap peer (the same as `p2pswarm-bootstrap`).")(_bootstrap)


@app.command("eval")
def evaluate(
    config: ConfigOpt = None,
    sets: SetOpt = [],  # noqa: B006
    model: Annotated[Optional[str], typer.Option(help="'embedded', a checkpoint's model/ folder, or a hub name")] = None,
    preset: Annotated[Optional[str], typer.Option()] = None,
    size: Annotated[int, typer.Option(help="held-out tasks to score (at most 200)")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Greedy accuracy of a policy on the held-out split of the game (`--set game=...`), overall and per dataset."""
    s = _settings(config, sets, model=model, preset=preset, eval_size=size)
    _setup_logging(s.log_level)
    from p2pswarm import models
    from p2pswarm.node import GAME_BUILDERS, configure_torch
    from p2pswarm.trainer import GRPOTrainer

    configure_torch(s)
    device = models.pick_device(s.device)
    m, tok = models.load(s.model, device, models.pick_dtype(s.dtype, device))
    # Held-out accuracy without the format bonus: format_weight shapes training, not the figure reported.
    data, rewards = GAME_BUILDERS[s.game](s.model_copy(update={"format_weight": 0.0}), "")
    tasks = data.with_prompts(data.eval_tasks())
    result = GRPOTrainer(m, tok, s, device).evaluate(tasks, rewards.reward)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            typer.echo(f"{k:32s} {v:.3f}")


DrivePathOpt = Annotated[Optional[str], typer.Option(
    "--drive-path", envvar=["GDRIVE_PATH", "P2PSWARM_DRIVE_PATH"], show_envvar=False,
    help="the shared folder or fsspec URL (GDRIVE_PATH)")]
ExperimentOpt = Annotated[Optional[str], typer.Option(
    envvar=["EXPERIMENT_NAME", "P2PSWARM_EXPERIMENT"], show_envvar=False, help="experiment name (EXPERIMENT_NAME)")]


@app.command()
def status(
    drive_path: DrivePathOpt = None,
    experiment: ExperimentOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    peer_timeout: Annotated[float, typer.Option(help="a heartbeat older than this (s) is not live")] = 60.0,
) -> None:
    """Drive mode: an experiment's round, its peers (heartbeat, round) and their rewards."""
    from p2pswarm.analysis import format_status, get_experiment_status, list_experiments

    if not drive_path:
        _fail("status reads a shared folder: --drive-path PATH (or GDRIVE_PATH)")
    if not experiment:
        names = list_experiments(drive_path)
        _fail(f"which experiment? --experiment NAME (or EXPERIMENT_NAME); in {drive_path}: {', '.join(names) or 'none'}")
    st = get_experiment_status(drive_path, experiment, peer_timeout=peer_timeout)
    typer.echo(json.dumps(st, indent=2, default=str) if as_json else format_status(st))


@app.command()
def report(
    drive_path: DrivePathOpt = None,
    experiment: ExperimentOpt = None,
    runs_dir: Annotated[Optional[Path], typer.Option(help="read local run folders <runs-dir>/<experiment>/<node>/ instead")] = None,
    out: Annotated[Optional[Path], typer.Option(help="the PNG to write (default <experiment>-rewards.png)")] = None,
    metric: Annotated[Optional[str], typer.Option(help="the metrics.jsonl column to plot (default reward_local_mean, or the fork's my_reward where a node has none)")] = None,
    window: Annotated[int, typer.Option(help="rounds in the rolling mean", min=1)] = 5,
) -> None:
    """A PNG of reward per round per node, from the shared folder's logs or local run folders."""
    from p2pswarm.analysis import get_experiment_metrics, get_run_metrics, plot_rewards

    experiment = experiment or "default"
    if runs_dir is not None or not drive_path:
        source = runs_dir or Path("runs")
        df = get_run_metrics(source, experiment)
    else:
        source = drive_path
        df = get_experiment_metrics(drive_path, experiment)
    if metric is None:  # an experiment of the rl-swarm fork's nodes only logs my_reward
        has = lambda col: col in df and not df[col].isna().all()  # noqa: E731
        metric = "reward_local_mean" if has("reward_local_mean") or not has("my_reward") else "my_reward"
    if df.empty or metric not in df or df[metric].isna().all():
        _fail(f"no {metric} values yet for experiment {experiment!r} in {source}", 1)
    path = plot_rewards(df, out or Path(f"{experiment}-rewards.png"), title=f"{experiment}: {metric} per round", metric=metric,
                        window=window)
    typer.echo(f"report written to {path.resolve()} ({df['node'].nunique()} node(s), rounds "
               f"{int(df['round'].min())}-{int(df['round'].max())})")


# ---- p2pswarm chain (docs/chain.md) ---------------------------------------------------------------------------
chain_app = typer.Typer(cls=_Commands, help="The on-chain round clock: a local chain, and a contract's status.",
                        no_args_is_help=True)
app.add_typer(chain_app, name="chain")
RpcOpt = Annotated[str, typer.Option("--rpc", help="the chain's http(s) JSON-RPC URL")]
ContractOpt = Annotated[str, typer.Option("--contract", help="the SwarmCoordinator's address (0x...)")]


@chain_app.command("status")
def chain_status(
    rpc: RpcOpt,
    contract: ContractOpt,
    abi: Annotated[str, typer.Option(help="the contract's flavour: p2pswarm or gensyn-0.4.2")] = "p2pswarm",
    chain_id: Annotated[int, typer.Option(help="the chain id the RPC must report (0: any)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A contract's round and stage, its registered peers (proof ok / absent) and their total rewards."""
    from web3 import HTTPProvider, Web3

    from p2pswarm.comm.chain.client import ChainClient, ChainError
    from p2pswarm.identity import friendly_name

    if not rpc.startswith(("http://", "https://")):
        raise ChainError(f"--rpc {rpc!r} is not an http(s):// JSON-RPC URL")
    from eth_account import Account

    reader = Account.create()  # reads need no key of the user's
    client = ChainClient(Web3(HTTPProvider(rpc, request_kwargs={"timeout": 10})), contract, reader, flavour=abi,
                         chain_id=chain_id, where=f"the chain at {rpc}")
    round_, stage = client.round()
    rows = [{"peer_id": r.peer_id, "name": friendly_name(r.peer_id), "eoa": r.eoa,
             "proof": "ok" if r.proven else "absent", "total_reward": client.total_reward(r.peer_id, r.eoa)}
            for r in client.registrations()]
    st = {"chain_id": client.chain_id, "contract": client.address, "abi": abi, "round": round_, "stage": stage,
          "deadline": client.deadline(), "chain_time": client.chain_time(), "peers": rows}
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"chain {st['chain_id']}, contract {st['contract']} ({abi}): round {round_}, stage {stage}"
               + (f", may advance in {max(0, st['deadline'] - st['chain_time'])} s" if st["deadline"] else ""))
    if abi != "p2pswarm":
        typer.echo("(Gensyn's contract cannot list its peers)")
    for r in rows:
        typer.echo(f"  {r['name']:<32} {r['peer_id'][-8:]}  {r['eoa']}  proof {r['proof']:<6}  reward {r['total_reward']:.3f}")


@chain_app.command("local")
def chain_local(
    round_seconds: Annotated[float, typer.Option(help="the contract's stage duration: the shortest round")] = 30.0,
    port: Annotated[int, typer.Option(help="anvil's port on 127.0.0.1 (0: any free)")] = 8545,
) -> None:
    """Start anvil on 127.0.0.1 with our contract deployed, for nodes in separate processes; runs until Ctrl-C.
    Nodes join with --set chain=<RPC URL> --set chain_contract=<address> --set chain_id=31337; their keys
    are funded as they register only on this local chain (see docs/chain.md)."""
    import time

    from p2pswarm.comm.chain.local import LocalChain

    _setup_logging("INFO")
    chain = LocalChain.anvil(stage_seconds=round_seconds, port=port)
    typer.echo(f"chain RPC {chain.url}  contract {chain.contract}  chain id {chain.w3.eth.chain_id}")
    typer.echo(f"nodes: --set chain={chain.url} --set chain_contract={chain.contract} --set chain_id={chain.w3.eth.chain_id}")
    try:
        while chain.process.poll() is None:
            time.sleep(0.5)
        _fail("anvil exited", 1)
    except KeyboardInterrupt:
        pass
    finally:
        chain.close()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

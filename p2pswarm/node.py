"""Assembling a node from settings, and running one or several agents in this process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from p2pswarm import events as ev
from p2pswarm import models
from p2pswarm.comm.inprocess import InProcessComm, InProcessHub, LocalCoordinator
from p2pswarm.comm.torchdist.env import (RankEnv, env_rank, node_name, quiet_other_ranks, rank_device,
                                       threads_per_rank)
from p2pswarm.components import CommunicationManager, Coordinator, DataManager, RewardManager
from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.data.multistage import CritiqueData
from p2pswarm.data.revise import ReviseData
from p2pswarm.data.textset import TextData
from p2pswarm.errors import UserError
from p2pswarm.events import EventBus, JsonlEventLog
from p2pswarm.game import GameManager, LockstepGameManager
from p2pswarm.hub import attach_hub_push
from p2pswarm.identity import Identity
from p2pswarm.rewards import ReasoningGymRewards
from p2pswarm.run import RunDir
from p2pswarm.settings import Settings, ignored_fork_variables
from p2pswarm.trackers import attach_trackers
from p2pswarm.trainer import GRPOTrainer

log = logging.getLogger(__name__)

_configured_threads = False


def configure_torch(settings: Settings) -> None:
    global _configured_threads
    # Denormal floats made the first CPU training steps ~50x slower with the tiny policy.
    torch.set_flush_denormal(True)
    if not _configured_threads:
        threads = default_threads(settings)
        if threads:
            torch.set_num_threads(threads)
        _configured_threads = True


def default_threads(settings: Settings) -> int | None:
    """torch's intra-op threads for this node: the `threads` setting, else a choice below, else None (torch's
    own: all cores)."""
    if settings.threads:
        return settings.threads
    if settings.agents > 1:
        return 1  # N agents share the cores; one intra-op thread each avoids oversubscription
    if settings.comm == "torch":
        return threads_per_rank()  # several ranks on this machine share its cores
    if settings.model == models.EMBEDDED:
        return 1  # its matmuls (at most 64 x 512) are too small to split: a round ran 1.5-1.9x faster on 1 thread
    return None


def identity_path(settings: Settings, index: int) -> Path:
    """One identity per agent: `identity.key`, `identity-<i>.key` (in-process agents) or
    `identity-rank<R>.key` (torch ranks), next to --identity, else in the output folder: the node's own
    (runs/<experiment>/<node_id>) when it has a name, so that nodes sharing a runs folder stay distinct peers."""
    if settings.comm == "torch":
        suffix = f"-rank{index}"
    else:
        suffix = f"-{index}" if settings.agents > 1 else ""
    if settings.identity_path is not None:
        p = settings.identity_path
        return p.with_name(f"{p.stem}{suffix}{p.suffix}")
    base = settings.output_dir or settings.runs_dir / settings.experiment
    if settings.output_dir is None and settings.node_id and not suffix:
        base = base / settings.node_id  # a single named node (ranks and agents have their suffix already)
    return base / f"identity{suffix}.key"


# The DataManager and RewardManager of each game (p2pswarm.data.GAMES describes them), from an agent's
# settings (its own seed) and its peer id.
GameBuilder = Callable[[Settings, str], tuple[DataManager, RewardManager]]


def _reasoning_gym(data_cls: type[ReasoningGymData]) -> GameBuilder:
    def build(s: Settings, peer: str) -> tuple[DataManager, RewardManager]:
        data = data_cls(s.preset, seed=s.seed, tasks_per_round=s.tasks_per_round, peer=peer, eval_size=s.eval_size)
        return data, ReasoningGymRewards(s.format_weight)

    return build


def _tictactoe(s: Settings, peer: str) -> tuple[DataManager, RewardManager]:
    from p2pswarm.data.board import BoardRewards, TicTacToeData

    return (TicTacToeData(seed=s.seed, tasks_per_round=s.tasks_per_round, peer=peer, eval_size=s.eval_size),
            BoardRewards(s.format_weight))


def _text(data_cls: type[TextData]) -> GameBuilder:
    """A question/answer file (p2pswarm/data/textset.py), scored by its verifier at every stage."""
    def build(s: Settings, peer: str) -> tuple[DataManager, RewardManager]:
        data = data_cls.from_settings(s, seed=s.seed, peer=peer)
        return data, ReasoningGymRewards(s.format_weight, stage_fns=data.stage_rewards())
    return build


GAME_BUILDERS: dict[str, GameBuilder] = {
    "reasoning-gym": _reasoning_gym(ReasoningGymData),
    "revise": _reasoning_gym(ReviseData),
    "tictactoe": _tictactoe,
    "text": _text(TextData),
    "text-critique": _text(CritiqueData),
}


def make_transport(settings: Settings, identity: Identity, hub: InProcessHub | None, *, name: str = "",
                   device: torch.device | None = None, output: Path | None = None,
                   key_path: Path | None = None,
                   initial_peers: list[str] | None = None) -> tuple[CommunicationManager, Coordinator]:
    """The CommunicationManager and Coordinator that `settings.comm` names (one branch per backend)."""
    if settings.comm in ("hivemind", "auto", "hybrid"):
        from p2pswarm.comm import hivemind
        from p2pswarm.comm.hivemind.node import StartupError

        try:
            dht = hivemind.connect(settings, identity, key_path or identity_path(settings, 0), name=name or identity.name,
                                   state_dir=output, initial_peers=initial_peers)
        except StartupError as e:
            if settings.comm == "hivemind":
                raise
            log.warning("the DHT is out of reach (%s): running in Drive mode through %s", e, settings.drive_path)
            return make_transport(settings.model_copy(update={"comm": "drive"}), identity, hub, name=name)
        if settings.comm == "auto":
            log.info("the DHT is reachable: running over hivemind (Drive mode stays the fallback)")
        if settings.comm != "hybrid":
            return dht
        from p2pswarm.comm.bridge import FurthestClock, HybridComm

        folder, folder_clock = make_transport(settings.model_copy(update={"comm": "drive"}), identity, hub, name=name)
        log.info("bridging the DHT and the shared folder %s", settings.drive_path)
        return HybridComm(dht[0], folder), FurthestClock(dht[1], folder_clock)
    if settings.comm == "inprocess":
        comm = InProcessComm(hub or InProcessHub(), identity, settings.experiment, settings.collect_timeout, settings.collect_peers)
        return comm, LocalCoordinator()
    if settings.comm == "torch":
        from p2pswarm.comm.torchdist.coordinator import TorchDistCoordinator
        from p2pswarm.comm.torchdist.manager import LOCKSTEP_SETTINGS, TorchDistComm

        comm = TorchDistComm(
            identity, settings.experiment, name=name or identity.name, device=device or torch.device("cpu"),
            timeout=settings.dist_timeout, output=str(output or ""),
            lockstep={k: getattr(settings, k) for k in LOCKSTEP_SETTINGS},
        )
        quiet_other_ranks(comm.rank, settings.log_level)
        return comm, TorchDistCoordinator(comm)
    if settings.comm == "drive":
        from p2pswarm.comm.drive.coordinator import FolderCoordinator
        from p2pswarm.comm.drive.manager import FolderComm
        from p2pswarm.comm.drive.store import FolderStore

        store = FolderStore(settings.drive_path, settings.experiment)
        store.open_folder(coordinator=settings.role == "coordinator")
        store.claim_name(name or identity.name, identity.peer_id)
        comm = FolderComm(settings.drive_path, identity, settings.experiment, name=name or identity.name,
                          timeout=settings.collect_timeout, want_peers=settings.collect_peers,
                          poll=settings.drive_poll_interval, peer_timeout=settings.drive_peer_timeout, role=settings.role,
                          trust_folder=settings.drive_trust_folder)
        return comm, FolderCoordinator(comm, role=settings.role,
                                       quorum=settings.collect_peers, deadline=settings.round_deadline,
                                       keep_rounds=settings.keep_rounds, archive=settings.archive_rollouts)
    raise ValueError(f"unknown comm backend {settings.comm!r}")


def build_agent(settings: Settings, *, index: int = 0, hub: InProcessHub | None = None, device=None,
                initial_peers: list[str] | None = None) -> GameManager:
    configure_torch(settings)
    torch_rank = settings.comm == "torch"
    if torch_rank:
        index = env_rank()  # one agent per process: its index is the global rank
    key_path = identity_path(settings, index)
    identity = Identity.load_or_create(key_path)
    name = settings.node_id or identity.name
    if settings.agents > 1 and settings.node_id:
        name = f"{settings.node_id}-{index}"
    if torch_rank:
        name = node_name(settings.node_id, identity, index)
    if settings.output_dir is not None and (settings.agents > 1 or torch_rank):
        run = RunDir(settings.output_dir / name)
    else:
        run = RunDir(settings.run_dir(name))
    device = device or models.pick_device(settings.device)
    if torch_rank:
        device = rank_device(device, RankEnv.from_env().local_rank)
    model, tokenizer = models.load(settings.model, device, models.pick_dtype(settings.dtype, device))
    agent_settings = settings.model_copy(update={"seed": settings.seed + index})
    data, rewards = GAME_BUILDERS[settings.game](agent_settings, identity.peer_id)
    events = EventBus(identity.peer_id)
    run.repair_events()  # a last line a kill cut short would swallow the first event of this start
    events.subscribe(JsonlEventLog(run.events_path))
    comm, coordinator = make_transport(settings, identity, hub, name=name, device=device, output=run.path,
                                       key_path=key_path, initial_peers=initial_peers)
    comm.set_ban_policy(settings.ban_strikes, settings.ban_seconds)
    if settings.chain:  # the chain's round replaces the backend's clock (docs/chain.md)
        from p2pswarm.comm.chain import make_coordinator

        coordinator.close()
        coordinator = make_coordinator(settings, identity, run.path)
        events.subscribe(coordinator.on_event)
    if settings.comm in ("drive", "auto", "hybrid"):  # logs and checkpoints in the shared folder (docs/drive-mode.md)
        from p2pswarm.comm.drive.manager import FolderComm
        from p2pswarm.comm.drive.mirror import attach_mirror

        folder = comm if isinstance(comm, FolderComm) else getattr(comm, "folder", None)
        if isinstance(folder, FolderComm):
            attach_mirror(folder, run, events, keep=settings.keep_checkpoints)
    attach_hub_push(settings, run, events, name)
    attach_trackers(settings, run, events, name)
    game_cls = LockstepGameManager if torch_rank else GameManager
    return game_cls(
        data=data,
        rewards=rewards,
        trainer=GRPOTrainer(model, tokenizer, agent_settings, device),
        comm=comm,
        coordinator=coordinator,
        run=run,
        settings=agent_settings,
        events=events,
        name=name,
    )


def build_swarm(settings: Settings) -> list[GameManager]:
    """`settings.agents` agents: sharing one in-process hub, or each its own hivemind peer. Several hivemind
    agents with no initial peers get a local bootstrap peer (keeping the round clock) to join."""
    ignored = ignored_fork_variables()
    if ignored:
        log.warning(ignored)
    if settings.comm == "hivemind" and settings.agents > 1 and not settings.initial_peers:
        from p2pswarm.comm.hivemind.bootstrap import BootstrapPeer

        root = settings.output_dir or settings.runs_dir / settings.experiment
        boot = BootstrapPeer.from_settings(settings, root / "bootstrap.key", state_dir=root / "bootstrap",
                                           coordinator=True, host="127.0.0.1").start()
        if "host" not in settings.model_fields_set:  # a swarm of this machine: nothing listens beyond it
            settings = settings.model_copy(update={"host": "127.0.0.1"})
        try:
            agents = [build_agent(settings, index=i, initial_peers=boot.maddrs) for i in range(settings.agents)]
        except BaseException:
            boot.close()
            raise
        remaining = [len(agents)]

        def one_closed() -> None:  # the bootstrap goes when the last agent has left
            remaining[0] -= 1
            if remaining[0] == 0:
                boot.close()

        for a in agents:
            a.comm.add_close_callback(one_closed)
        return agents
    hub = InProcessHub()
    return [build_agent(settings, index=i, hub=hub) for i in range(settings.agents)]


def run_agents(agents: list[GameManager], rounds: int | None = None) -> None:
    """Run each agent in its own thread; returns when all have stopped. Errors are logged and re-raised."""
    errors: list[BaseException] = []

    def target(agent: GameManager) -> None:
        try:
            agent.run(rounds)
        except BaseException as e:  # noqa: BLE001 - reported below, after the others stop
            errors.append(e)  # first: nothing below may lose it
            for other in agents:
                other.request_stop()
            if not isinstance(e, UserError):  # RankFailure, CheckpointError...: a complete sentence, no traceback
                log.exception("%s failed", agent.name)
            agent.events.emit(ev.ERROR, message=f"{type(e).__name__}: {e}")
        finally:
            agent.comm.close()

    if len(agents) == 1:
        target(agents[0])
    else:
        threads = [threading.Thread(target=target, args=(a,), name=a.name, daemon=True) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    if errors:
        raise errors[0]

"""The one settings object. Precedence: defaults < TOML file (--config) < environment < CLI flags.

A setting's bare name (`seed`) is read from the TOML file, `--set` and keyword arguments only. The
environment is read for P2PSWARM_<NAME> (e.g. P2PSWARM_NUM_GENERATIONS=8) and for the names RL Swarm and
its Google-Drive fork use (MODEL_NAME, EXPERIMENT_NAME, NODE_ID, SEED, IDENTITY_PATH, INITIAL_PEERS,
GDRIVE_PATH, NODE_ROLE, NUM_TRAIN_SAMPLES, MAX_ROUNDS...): each is an extra alias of its field (`_env`), and
`environment_names()` gathers them all. A bare PORT, HOST or DEVICE set for another program never reaches
a node; an unknown P2PSWARM_* name is an error; the fork's variables that mean nothing here are named in
one warning (`ignored_fork_variables`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from p2pswarm.data import GAMES
from p2pswarm.errors import UserError
from p2pswarm.grpo import LOSS_TYPES

FORK_KEEP_ROUNDS = 10  # the fork's ROLLOUT_KEEP_LAST_N_ROUNDS default, when ROLLOUT_CLEANUP_ENABLED=true
_config_file: ContextVar[Path | None] = ContextVar("_config_file", default=None)


ENV_PREFIX = "P2PSWARM_"


def _env(name: str, *also: str) -> Any:
    """The names of setting `name`: itself (TOML file, --set, keyword arguments), and in the environment
    P2PSWARM_<NAME> and `also` (RL Swarm's and the Drive fork's names), first set first."""
    return AliasChoices(name, f"{ENV_PREFIX}{name.upper()}", *also)


class SettingsError(UserError, ValueError):
    """A setting has an invalid value; the message names it."""


# A Hub repository's user or name part (the Hub refuses others; "--" and ".." are reserved).
_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def _hub_name(part: str) -> bool:
    return bool(_HUB_NAME.fullmatch(part)) and "--" not in part and ".." not in part


# The Drive fork's variables that have no meaning here, and why (one warning names those set: build_swarm).
FORK_IGNORED = {
    "MAX_STAGES": "the game sets its stages",
    "ADAPTIVE_IJ_ENABLED": "p2pswarm's own rule: split=adaptive",
    "ADAPTIVE_IJ_ALPHA": "split=adaptive: adaptive_alpha",
    "ADAPTIVE_IJ_BASELINE_ALPHA": "split=adaptive has no baseline",
    "ADAPTIVE_IJ_INITIAL_J": "split=adaptive sizes J every round",
    "SUBMIT_PERIOD_HOURS": "rewards are logged every round",
    "LOG_FLUSH_INTERVAL": "logs are mirrored to the folder every few polls",
    "COORDINATOR_ROUND_INTERVAL": "the coordinator trains too, and ends a round on a quorum or round_deadline",
    "CACHE_ROLLOUTS": "rollouts are not cached locally",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="P2PSWARM_", extra="forbid", validate_default=True)

    # --- who and where --------------------------------------------------------------------------
    experiment: str = Field("default", validation_alias=_env("experiment", "EXPERIMENT_NAME"), min_length=1,
                            description="experiment (swarm) name; peers only exchange within one")
    node_id: str | None = Field(None, validation_alias=_env("node_id", "NODE_ID"),
                                description="display name; default: a friendly name derived from the peer id")
    identity_path: Path | None = Field(None, validation_alias=_env("identity_path", "IDENTITY_PATH"),
                                       description="Ed25519 identity file (created on first run, 0600)")
    runs_dir: Path = Field(Path("runs"), validation_alias=_env("runs_dir"))
    output_dir: Path | None = Field(None, validation_alias=_env("output_dir"),
                                    description="default: <runs_dir>/<experiment>/<node_id>")
    seed: int = Field(42, validation_alias=_env("seed", "SEED"))
    rounds: int | None = Field(None, validation_alias=_env("rounds", "MAX_ROUNDS"), ge=1,
                               description="stop after this round count (default: run until stopped)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias=_env("log_level"))

    # --- model and device ----------------------------------------------------------------------
    model: str = Field("embedded", validation_alias=_env("model", "MODEL_NAME"),
                       description="'embedded', a local folder, or a Hugging Face causal LM name")
    device: str = Field("auto", validation_alias=_env("device"), description="auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", validation_alias=_env("dtype"))
    threads: int = Field(0, validation_alias=_env("threads"), ge=0,
                         description="torch CPU threads (0: 1 for the embedded policy, whose matmuls are too small to "
                                     "split, or one per agent or torch rank; else all cores)")

    # --- the game --------------------------------------------------------------------------------
    game: Literal["reasoning-gym", "revise", "tictactoe",
                  "text", "text-critique"] = Field("reasoning-gym", validation_alias=_env("game"),
                                                   description="what the swarm plays (`p2pswarm run --game help` lists the games)")
    preset: str = Field("easy", validation_alias=_env("preset"),
                        description="reasoning-gym preset ('easy', 'rl-swarm') or a TOML/YAML file")
    tasks_per_round: int = Field(8, validation_alias=_env("tasks_per_round"), ge=1)
    format_weight: float = Field(0.0, validation_alias=_env("format_weight"), ge=0)
    eval_every: int = Field(10, validation_alias=_env("eval_every"), ge=0, description="rounds between held-out evals (0: never)")
    eval_size: int = Field(100, validation_alias=_env("eval_size"), ge=1, le=200)
    # game=text / text-critique: a question/answer file (p2pswarm/data/textset.py, docs/environments.md)
    data_path: Path | None = Field(None, validation_alias=_env("data_path"),
                                   description="game=text, text-critique: a .jsonl/.json/.csv/.parquet file or a folder "
                                               "saved by datasets' save_to_disk (default: the shipped arith.jsonl)")
    data_question: str = Field("question", validation_alias=_env("data_question"), min_length=1,
                               description="game=text: the dataset's question column")
    data_answer: str = Field("answer", validation_alias=_env("data_answer"), min_length=1,
                             description="game=text: the dataset's answer column")
    data_verifier: str = Field("exact", validation_alias=_env("data_verifier"), min_length=1,
                               description="game=text: how answers are checked: exact, numeric, math, or a "
                                           "function 'module:function' (answer, truth) -> 0..1")
    data_tolerance: float = Field(1e-6, validation_alias=_env("data_tolerance"), ge=0,
                                  description="game=text, data_verifier=numeric: relative and absolute tolerance")

    # --- the swarm -------------------------------------------------------------------------------
    comm: Literal["hivemind", "inprocess", "torch", "drive", "auto", "hybrid"] = Field(
        "hivemind", validation_alias=_env("comm"),
        description="'hivemind': peers over a DHT (the default); 'inprocess': agents of this process only; "
                    "'torch': one agent per torchrun rank (docs/torch-distributed.md); "
                    "'drive': through a shared folder (docs/drive-mode.md); 'auto': the DHT if it can be "
                    "reached, else the folder; 'hybrid': both, bridging them")
    publish_frequency: Literal["generation", "stage", "round"] = Field(
        "stage", validation_alias=_env("publish_frequency", "ROLLOUT_PUBLISH_FREQUENCY"),
        description="when rollouts are exchanged: every stage ('generation' is the same here: a stage is one "
                    "batched generation), or once after the round's last stage ('round': fewest Drive API "
                    "calls; later stages then see only local answers)")
    agents: int = Field(1, validation_alias=_env("agents"), ge=1, le=64,
                        description="agents in this process (in-process swarm)")
    collect_timeout: float = Field(10.0, validation_alias=_env("collect_timeout", "FETCH_TIMEOUT_SECONDS"), gt=0,
                                   description="seconds to wait for other peers' rollouts in a stage")
    collect_peers: int = Field(0, validation_alias=_env("collect_peers", "FETCH_MAX_PEERS"), ge=0,
                               description="stop waiting once this many peers have published (0: all known)")
    accept_unverified_tasks: bool = Field(
        False, validation_alias=_env("accept_unverified_tasks"),
        description="train on swarm groups whose task this peer cannot regenerate (a custom DataManager "
                    "without rederive), trusting the sender's answer: any peer can then poison rewards")
    ban_strikes: int = Field(3, validation_alias=_env("ban_strikes"), ge=0,
                             description="invalid payloads/records from one peer (without a valid one in between) "
                                         "before it is ignored for a while (0: never ignore anyone)")
    ban_seconds: float = Field(30.0, validation_alias=_env("ban_seconds"), gt=0,
                               description="how long a peer is first ignored; doubles with each further ban, up to an hour")
    # comm=hivemind (docs/hivemind.md)
    initial_peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("initial_peers", "INITIAL_PEERS"),
        description="multiaddrs of peers to join (space- or comma-separated); none: start a new swarm")
    host: str = Field("0.0.0.0", validation_alias=_env("host"), description="comm=hivemind: address to listen on")
    port: int = Field(0, validation_alias=_env("port"), ge=0, le=65535, description="comm=hivemind: TCP port (0: any free)")
    announce_maddrs: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("announce_maddrs"),
        description="comm=hivemind: the multiaddrs others should dial (a public IP behind port forwarding)")
    client_mode: bool = Field(False, validation_alias=_env("client_mode"),
                              description="comm=hivemind: behind NAT, only dial out (others answer over our connections)")
    use_relay: bool = Field(True, validation_alias=_env("use_relay"), description="comm=hivemind: libp2p circuit relays")
    use_auto_relay: bool = Field(False, validation_alias=_env("use_auto_relay"),
                                 description="comm=hivemind: look for a relay to become reachable behind NAT")
    coordinator_peer: str | None = Field(None, validation_alias=_env("coordinator_peer"),
                                         description="comm=hivemind: peer id whose round clock to follow "
                                                     "(default: the initial peers')")
    round_seconds: float = Field(0.0, validation_alias=_env("round_seconds"), ge=0,
                                 description="comm=hivemind: with no coordinator, a time clock of rounds this long (0: off)")
    genesis: float = Field(0.0, validation_alias=_env("genesis"), ge=0,
                           description="comm=hivemind: unix time of round 0 for the time clock")
    max_clock_skew: float = Field(3.0, validation_alias=_env("max_clock_skew"), gt=0,
                                  description="comm=hivemind: refuse to join when this machine's clock is further off")
    # comm=hivemind, the gossip exchange (docs/hivemind.md "A round on the wire")
    sample_peers: int = Field(8, validation_alias=_env("sample_peers"), ge=0,
                              description="comm=hivemind: pull the batches of this many announcers a stage, drawn "
                                          "uniformly (failed pulls replaced by fresh draws; 0: every announcer)")
    quorum_fraction: float = Field(0.75, validation_alias=_env("quorum_fraction"), gt=0, le=1,
                                   description="comm=hivemind: the round keeper advances once this share of the "
                                               "trainers that played the last round finished this one (or at "
                                               "round_deadline)")
    gossip_shard_size: int = Field(32, validation_alias=_env("gossip_shard_size"), ge=0,
                                   description="comm=hivemind, the round keeper: split the swarm's topic into shards "
                                               "of at most this many trainers (powers of two; peers follow the "
                                               "keeper's clock), so a peer's topic traffic stays flat as the "
                                               "swarm grows (0: one topic)")
    gossip_inline: bool = Field(False, validation_alias=_env("gossip_inline"),
                                description="comm=hivemind: send batches up to 64 KiB on the topic itself, not only "
                                            "by pull (on by itself in client mode: peers may not dial us)")
    # comm=drive (docs/drive-mode.md)
    drive_path: str | None = Field(None, validation_alias=_env("drive_path", "GDRIVE_PATH"),
                                   description="comm=drive: the shared folder (a path, or any fsspec URL)")
    role: Literal["worker", "coordinator"] = Field("worker", validation_alias=_env("role", "NODE_ROLE"),
                                                   description="'coordinator' also keeps the swarm's round clock (one per "
                                                               "experiment; with comm=drive it also cleans up old rounds). "
                                                               "A hivemind node with no initial peers keeps it anyway")
    drive_poll_interval: float = Field(2.0, validation_alias=_env("drive_poll_interval"), gt=0,
                                       description="comm=drive: seconds between folder polls (backs off up to 4x)")
    drive_peer_timeout: float = Field(60.0, validation_alias=_env("drive_peer_timeout"), gt=0,
                                      description="comm=drive: a peer whose heartbeat is older than this is not live")
    drive_trust_folder: bool = Field(
        False, validation_alias=_env("drive_trust_folder"),
        description="comm=drive: everyone who writes to the shared folder is trusted: train on the unsigned .json "
                    "rollouts of rl-swarm Drive-fork nodes (their answers taken as given) and publish a .json copy "
                    "of ours for them (docs/drive-mode.md, mixed experiments)")
    round_deadline: float = Field(300.0, validation_alias=_env("round_deadline"), gt=0,
                                  description="the coordinator advances the round this many seconds after the first "
                                              "node finished it, without waiting for a quorum")
    # comm=drive retention, the fork's: every round is kept unless cleanup is asked for (_derived resolves it)
    rollout_cleanup: bool | None = Field(
        None, validation_alias=_env("rollout_cleanup", "ROLLOUT_CLEANUP_ENABLED"),
        description="comm=drive: the coordinator retires rollouts older than keep_rounds (default: only when "
                    "keep_rounds is set; true alone keeps the fork's 10 rounds; false keeps everything)")
    keep_rounds: int = Field(0, validation_alias=_env("keep_rounds", "ROLLOUT_KEEP_LAST_N_ROUNDS", "KEEP_LAST_N_ROUNDS"), ge=0,
                             description="comm=drive: rounds of rollouts kept before the current one when cleanup "
                                         "is on (0: keep all)")
    archive_rollouts: bool = Field(False, validation_alias=_env("archive_rollouts", "ROLLOUT_ARCHIVE_OLD", "ARCHIVE_OLD_ROLLOUTS"),
                                   description="comm=drive: move retired rounds to archive/ instead of deleting them")
    dist_timeout: float = Field(0.0, validation_alias=_env("dist_timeout"), ge=0,
                                description="comm=torch: seconds a rank waits in a collective for the slowest rank "
                                            "before the run fails (0: max(60, 6 x collect_timeout))")

    # --- the round clock on a chain (docs/chain.md) ------------------------------------------------
    chain: str | None = Field(None, validation_alias=_env("chain"),
                              description="keep rounds on a SwarmCoordinator contract: 'local' (an in-process chain "
                                          "shared by this process's agents) or the chain's http(s) JSON-RPC URL "
                                          "(default: off, the comm backend's clock)")
    chain_contract: str | None = Field(None, validation_alias=_env("chain_contract"),
                                       description="the SwarmCoordinator's address (0x...), with a chain URL")
    chain_abi: Literal["p2pswarm", "gensyn-0.4.2"] = Field(
        "p2pswarm", validation_alias=_env("chain_abi"),
        description="the contract's flavour: ours, or Gensyn's SwarmCoordinator 0.4.2 (follow only)")
    chain_id: int = Field(0, validation_alias=_env("chain_id"), ge=0,
                          description="the chain id the RPC must report (checked at start; required with a URL)")
    chain_key_path: Path | None = Field(None, validation_alias=_env("chain_key_path"),
                                        description="the node's Ethereum key file (created on first use, 0600; "
                                                    "default: chain.key in the node's run folder)")
    chain_poll: float = Field(2.0, validation_alias=_env("chain_poll"), gt=0,
                              description="seconds between reads of the chain's round while waiting for it")
    chain_round_seconds: float = Field(30.0, validation_alias=_env("chain_round_seconds"), ge=1,
                                       description="--chain local: the contract's stage duration (the shortest round)")
    chain_submit_rewards: bool = Field(False, validation_alias=_env("chain_submit_rewards"),
                                       description="submit each round's mean local reward and winners to the contract")

    # --- GRPO / SAPO -----------------------------------------------------------------------------
    num_generations: int = Field(4, validation_alias=_env("num_generations", "NUM_GENERATIONS"), ge=2, description="G, completions per task")
    local_groups: int = Field(4, validation_alias=_env("local_groups", "NUM_TRAIN_SAMPLES"), ge=0, description="I, local groups per update")
    swarm_groups: int = Field(4, validation_alias=_env("swarm_groups", "NUM_TRANSPLANT_TREES"), ge=0, description="J, swarm groups per update (0: plain GRPO)")
    # Selection of the update's groups (p2pswarm/selection.py, README "Choosing I and J").
    selection: Literal["p2p", "paper"] = Field(
        "p2p", validation_alias=_env("selection"),
        description="p2p: train only groups with a learning signal, local and swarm; paper: SAPO's protocol, "
                    "only swarm groups are filtered (flat local groups train with advantage 0)")
    split: Literal["fixed", "adaptive"] = Field(
        "fixed", validation_alias=_env("split"),
        description="fixed: I=local_groups, J=swarm_groups; adaptive: I+J is a budget that local signal groups "
                    "fill first and swarm signal groups top up, from peers whose groups carried signal; "
                    "I-only while the swarm's groups are flat or missing")
    adaptive_alpha: float = Field(0.2, validation_alias=_env("adaptive_alpha"), gt=0, le=1,
                                  description="split=adaptive: weight of the newest round in the running worths")
    adaptive_min_worth: float = Field(0.05, validation_alias=_env("adaptive_min_worth"), ge=0, le=1,
                                      description="split=adaptive: below this running share of swarm groups with "
                                                  "signal, updates are I-only")
    max_new_tokens: int = Field(32, validation_alias=_env("max_new_tokens"), ge=1)
    max_prompt_tokens: int = Field(1024, validation_alias=_env("max_prompt_tokens"), ge=8)
    temperature: float = Field(1.0, validation_alias=_env("temperature"), gt=0)
    top_p: float = Field(1.0, validation_alias=_env("top_p"), gt=0, le=1)
    learning_rate: float = Field(0.0, validation_alias=_env("learning_rate"), ge=0,
                                 description="0: 1e-4 for the embedded policy, 1e-6 for any other model")
    weight_decay: float = Field(0.0, validation_alias=_env("weight_decay"), ge=0)
    adam_beta2: float = Field(0.99, validation_alias=_env("adam_beta2"), gt=0, lt=1,
                              description="AdamW's second-moment decay (0.99: its step size follows the noisy "
                                          "policy gradient's scale within ~100 updates)")
    beta: float = Field(0.0, validation_alias=_env("beta"), ge=0, description="KL weight (a reference model only when > 0)")
    epsilon: float = Field(0.2, validation_alias=_env("epsilon"), gt=0, lt=1)
    epsilon_high: float = Field(0.28, validation_alias=_env("epsilon_high"), gt=0)
    loss_type: str = Field("grpo", validation_alias=_env("loss_type"))
    num_iterations: int = Field(1, validation_alias=_env("num_iterations"), ge=1,
                                description="gradient steps per batch (1: the plain policy gradient; more reuse the "
                                            "batch off-policy under the clip)")
    max_grad_norm: float = Field(1.0, validation_alias=_env("max_grad_norm"), ge=0)
    micro_batch_size: int = Field(8, validation_alias=_env("micro_batch_size"), ge=1,
                                  description="sequences per forward/backward (gradient accumulation over the rest)")
    gradient_checkpointing: bool = Field(False, validation_alias=_env("gradient_checkpointing"))

    # --- decoding (p2pswarm/decoding.py) ---------------------------------------------------------
    decoder: Literal["auto", "ours", "hf"] = Field(
        "auto", validation_alias=_env("decoder"),
        description="sampling loop: 'ours' (static KV cache, sampling on the device), 'hf' (transformers' generate), "
                    "'auto' (ours where the model allows it, else generate, said once in the log)")
    decoder_compile: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias=_env("decoder_compile"),
        description="torch.compile our decoding step: 'auto' on CUDA only (CUDA graphs; on CPU it did not pay, "
                    "bench/README.md), 'on', 'off'")

    fused_forward: Literal["auto", "off"] = Field(
        "auto", validation_alias=_env("fused_forward"),
        description="'auto': Qwen2, Llama and Mistral models decode and train through p2pswarm's fused forward "
                    "(p2pswarm/fastlm.py: the same maths in a few ops a layer); 'off': transformers' forward")

    # --- checkpoints -----------------------------------------------------------------------------
    checkpoint_every: int = Field(5, validation_alias=_env("checkpoint_every", "CHECKPOINT_INTERVAL"), ge=1)
    keep_checkpoints: int = Field(3, validation_alias=_env("keep_checkpoints"), ge=1)

    # --- Hugging Face Hub push (p2pswarm/hub.py) ------------------------------------------------
    hub_token: SecretStr | None = Field(
        None, validation_alias=_env("hub_token", "HUGGINGFACE_ACCESS_TOKEN"),
        description="a Hugging Face write token: push the policy to the Hub every hub_push_every rounds "
                    "(never logged, never stored)")
    hub_repo: str | None = Field(
        None, validation_alias=_env("hub_repo"),
        description="the Hub repository ('user/name', or 'name' under the token's user); setting it also turns "
                    "pushing on with HF_TOKEN or a saved `hf auth login`. Default: "
                    "<token's user>/<model>-Gensyn-Swarm-<node name>, as RL Swarm names it")
    hub_push_every: int = Field(20, validation_alias=_env("hub_push_every"), ge=0,
                                description="rounds between Hub pushes, at the first checkpoint after each "
                                            "(RL Swarm's 20); the last checkpoint is pushed at a clean stop (0: never push)")

    # --- experiment trackers (p2pswarm/trackers.py): the rows of metrics.jsonl, live ---------------
    tensorboard_dir: Path | None = Field(
        None, validation_alias=_env("tensorboard_dir"),
        description="write TensorBoard event files to <tensorboard_dir>/<node name> (pip install 'p2pswarm[tensorboard]')")
    wandb_project: str | None = Field(
        None, validation_alias=_env("wandb_project"),
        description="log to this Weights & Biases project, one W&B run per node (pip install 'p2pswarm[wandb]')")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", validation_alias=_env("wandb_mode"),
        description="offline: a run folder under the node's output (upload later with `wandb sync`), no "
                    "network or account needed; online: stream to wandb.ai (needs `wandb login` or WANDB_API_KEY)")

    @field_validator("game", mode="before")
    @classmethod
    def _game(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in GAMES:
            raise ValueError(f"unknown game {v!r}: one of {', '.join(GAMES)} (`p2pswarm run --game help` describes them)")
        return v

    @field_validator("loss_type")
    @classmethod
    def _loss_type(cls, v: str) -> str:
        if v not in LOSS_TYPES:
            raise ValueError(f"must be one of {', '.join(LOSS_TYPES)}")
        return v

    @field_validator("initial_peers", "announce_maddrs", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):  # INITIAL_PEERS="/ip4/.../p2p/A /ip4/.../p2p/B" or comma-separated
            return [x for x in v.replace(",", " ").split() if x]
        if isinstance(v, (list, tuple)):
            return [x for item in v for x in str(item).replace(",", " ").split() if x]
        return v

    @field_validator("initial_peers", "announce_maddrs")
    @classmethod
    def _maddrs(cls, v: list[str]) -> list[str]:
        for m in v:
            if not m.startswith(("/ip4/", "/ip6/", "/dns", "/p2p/")):
                raise ValueError(f"{m!r} is not a multiaddr (like /ip4/203.0.113.5/tcp/38331/p2p/12D3KooW...)")
        return v

    @field_validator("hub_token", mode="before")
    @classmethod
    def _hub_token(cls, v: Any) -> Any:
        # RL Swarm's launch script exports HUGGINGFACE_ACCESS_TOKEN=None when the user declines to push.
        if isinstance(v, str) and v.strip() in ("", "None"):
            return None
        return v

    @field_validator("hub_repo")
    @classmethod
    def _hub_repo(cls, v: str | None) -> str | None:
        parts = v.split("/") if v is not None else []
        if v is not None and not (len(parts) <= 2 and all(_hub_name(p) for p in parts)):
            raise ValueError("must be 'user/name' or 'name': letters, digits, '-', '_', '.' (at most 96 each)")
        return v

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str | None) -> str | None:
        # Other peers refuse a member record or registration whose name is not 1..64 printable characters
        # (p2pswarm/validate.py); 48 leaves room for the `-rank<R>` / `-<agent>` suffixes.
        if v is not None and not (1 <= len(v) <= 48 and v.isprintable()):
            raise ValueError("must be 1 to 48 printable characters (other peers show it as this node's name)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    @field_validator("comm")
    @classmethod
    def _comm(cls, v: str) -> str:
        if v == "torch":
            missing = [n for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
            if missing:
                raise ValueError(f"'torch' runs under torchrun ({', '.join(missing)} not set): "
                                 "torchrun --nproc-per-node N -m p2pswarm run --comm torch, or scripts/train_torch.sh")
        return v

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if self.comm == "torch" and self.agents > 1:
            raise ValueError("comm=torch runs one agent per process: keep agents=1 and start N ranks with torchrun")
        if self.comm in ("drive", "auto", "hybrid") and not self.drive_path:
            raise ValueError(f"comm={self.comm} needs the shared folder: set drive_path (--drive-path or GDRIVE_PATH)")
        if self.comm == "drive" and self.role == "coordinator" and self.agents > 1:
            raise ValueError("role=coordinator keeps the swarm's one round clock: run it with agents=1")
        if self.rollout_cleanup is None:  # P2PSWARM_KEEP_ROUNDS alone turns cleanup on, as it always did
            self.rollout_cleanup = self.keep_rounds > 0
        elif self.rollout_cleanup and "keep_rounds" not in self.model_fields_set:
            self.keep_rounds = FORK_KEEP_ROUNDS
        if not self.rollout_cleanup or self.keep_rounds == 0:  # off wins: nothing is deleted unless asked
            self.rollout_cleanup, self.keep_rounds = False, 0
        if self.dist_timeout == 0.0:
            self.dist_timeout = max(60.0, 6 * self.collect_timeout)
        if self.learning_rate == 0.0:
            # The embedded policy: 1e-4 with one step per batch and Adam's beta2 0.99 (bench/learning.py);
            # 3e-4 collapsed it. Pretrained models of 0.5B+ parameters need far smaller steps.
            self.learning_rate = 1e-4 if self.model == "embedded" else 1e-6
        if self.chain is not None and self.chain != "local":
            if not self.chain.startswith(("http://", "https://")):
                raise ValueError(f"chain must be 'local' or an http(s):// JSON-RPC URL, not {self.chain!r}")
            if not self.chain_contract or self.chain_id == 0:
                raise ValueError("a chain URL needs chain_contract (the SwarmCoordinator's address) and chain_id")
        if self.local_groups + self.swarm_groups == 0:
            raise ValueError("local_groups + swarm_groups must be at least 1")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _Environment(settings_cls)]
        path = _config_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def run_dir(self, node_id: str) -> Path:
        return self.output_dir or self.runs_dir / self.experiment / node_id


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _names(field: str) -> list[str]:
    alias = Settings.model_fields[field].validation_alias
    return [n for n in alias.choices if isinstance(n, str)] if isinstance(alias, AliasChoices) else [field]


def environment_names() -> dict[str, str]:
    """Every environment variable a node reads -> its setting: the fields' aliases but their bare names, so
    that a name added to a field (`_env(..., "NAME")`) is known here without more code."""
    return {n: field for field in Settings.model_fields for n in _names(field) if n != field}


def read_environment(environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The settings the environment gives ({setting: value}) and the variable each came from ({setting:
    name}): for each setting its first name that is set, P2PSWARM_<NAME> before the others. An empty value
    counts as unset (notebooks write '' for "no value"). SettingsError, one line, for a P2PSWARM_* name that
    is no setting's, with the closest known name."""
    environ = os.environ if environ is None else environ
    known = environment_names()
    unknown = [k for k in environ if k.upper().startswith(ENV_PREFIX) and k not in known]
    if unknown:
        ours = [n for n in known if n.startswith(ENV_PREFIX)]
        hints = []
        for k in sorted(unknown):
            close = difflib.get_close_matches(k.upper(), ours, n=1, cutoff=0.6)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise SettingsError(f"unknown environment variable {', '.join(hints)}: p2pswarm reads P2PSWARM_<SETTING> "
                            "for its settings only (see `p2pswarm run --help` and README's Configuration)")
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    for field in Settings.model_fields:
        for n in _names(field):
            if n != field and environ.get(n, "") != "":
                values[field], origin[field] = environ[n], n
                break
    return values, origin


def ignored_fork_variables(environ: Mapping[str, str] | None = None) -> str | None:
    """One warning line naming the Drive fork's variables that are set and mean nothing here, or None."""
    environ = os.environ if environ is None else environ
    set_ = [f"{k} ({why})" for k, why in FORK_IGNORED.items() if environ.get(k, "") != ""]
    if not set_:
        return None
    return "ignoring the rl-swarm Drive fork's variables that mean nothing here: " + "; ".join(set_)


class _Environment(PydanticBaseSettingsSource):
    """The environment source: exactly the names of `read_environment`, case-sensitive (pydantic-settings'
    own would also read every bare setting name, in any case: PORT, host, Device...)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every name at once

    def __call__(self) -> dict[str, Any]:
        return read_environment()[0]


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from all sources; raises SettingsError naming the offending setting(s), or the environment
    variable the user set when the bad value came from there."""
    if config is not None and not Path(config).is_file():
        raise SettingsError(f"config file {config} does not exist")
    by_alias = {n: field for field in Settings.model_fields for n in _names(field)}
    # --set MODEL_NAME=x and --set model=x name one setting: by its field name it outranks the environment's.
    given = {by_alias.get(k, k): v for k, v in overrides.items() if v is not None}
    _, origin = read_environment()
    token = _config_file.set(Path(config) if config else None)
    try:
        return Settings(**given)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            name = ".".join(str(x) for x in err["loc"])
            field = by_alias.get(name, name)
            msg = err["msg"].removeprefix("Value error, ")
            if not name:
                lines.append(f"invalid settings: {msg}")
            elif err["type"] == "extra_forbidden":
                lines.append(f"unknown setting '{name}'")
            elif field in origin and field not in given:
                lines.append(f"setting '{field}' (environment variable {origin[field]}): {msg}")
            else:
                lines.append(f"setting '{field}' ({env_name(field)}): {msg}")
        raise SettingsError("; ".join(lines)) from None
    except SettingsError:
        raise
    except ValueError as e:  # a TOML syntax error, for instance
        raise SettingsError(f"{config}: {e}") from None
    finally:
        _config_file.reset(token)

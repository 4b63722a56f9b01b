"""What a rank learns from its launcher (torchrun, or a scheduler setting the env:// variables), and the
per-rank choices that follow from it: node name, CPU threads, GPU, log level. No process group here."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass

import torch

from p2pswarm.errors import UserError
from p2pswarm.identity import Identity

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(UserError, RuntimeError):
    """Another rank died, hung or left, or the ranks disagree; the message is one line meant for the user.

    A UserError, so it is shown as that line, never a traceback, and the game loop does not report it to
    the other ranks as a crash (the process group already left its own note). Still a RuntimeError, as it
    was before UserError existed, for callers that catch torch.distributed's errors that way."""


def missing_env(environ=os.environ) -> list[str]:
    return [v for v in REQUIRED_ENV if not environ.get(v)]


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job, from the env:// variables (LOCAL_* default to a one-machine job)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, environ=os.environ) -> RankEnv:
        missing = missing_env(environ)
        if missing:
            raise RankFailure(f"--comm torch runs under torchrun; {', '.join(missing)} not set")
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        return cls(
            rank=rank,
            world_size=world,
            local_rank=int(environ.get("LOCAL_RANK", rank)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
            master_addr=environ["MASTER_ADDR"],
            master_port=int(environ["MASTER_PORT"]),
        )


def env_rank() -> int:
    return RankEnv.from_env().rank


def node_name(node_id: str | None, identity: Identity, rank: int) -> str:
    """`<node_id>-rank<R>` when NODE_ID is given, else the friendly name derived from the peer id."""
    return f"{node_id}-rank{rank}" if node_id else identity.name


def threads_per_rank(environ=os.environ) -> int | None:
    """Torch CPU threads for a rank when several ranks share this machine (LOCAL_WORLD_SIZE > 1): its share
    of the cores, at least one. None when the rank is alone here (torch's own default)."""
    ranks_here = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks_here <= 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // ranks_here)


def quiet_other_ranks(rank: int, level: str) -> None:
    """Only rank 0 prints round lines: the other ranks log warnings and errors (everything at DEBUG).
    Every rank writes its full metrics.jsonl and events.jsonl either way."""
    if rank != 0 and level != "DEBUG":
        logging.getLogger("p2pswarm").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per rank on a node: `cuda` (or auto) becomes cuda:LOCAL_RANK; an explicit cuda:N is kept."""
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RankFailure(f"LOCAL_RANK {local_rank} but only {count} GPU(s) visible: start at most {count} "
                          "processes per node, or run on CPU with --device cpu")
    return torch.device("cuda", local_rank)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def first_line(e: BaseException) -> str:
    """The gist of a (backend) error: first line, without gloo's '[path/file.cc:123] ' prefix, first sentence."""
    text = str(e).strip().splitlines()
    line = next((t for t in text if t.strip()), type(e).__name__)
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line.strip())
    return line.split(". ")[0][:300]

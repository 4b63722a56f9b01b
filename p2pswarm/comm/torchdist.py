"""A swarm inside one trust domain over torch.distributed: one agent per rank, launched by torchrun.

    torchrun --nproc-per-node N -m p2pswarm run --comm torch --headless ...

Every exchange is a collective over the default process group, so all ranks call them in the same order:

    start-up   all_gather of each rank's announcement (peer id, node name, host, settings that must match)
    round      all_gather [resume point | finished round, stop wish]: rank 0's value is the swarm's clock
    stage      all_gather int64 [round, stage, nbytes]   (CPU tensors: gloo)
               all_gather uint8 [max nbytes]             (the rank's device: NCCL on CUDA, gloo on CPU)

The payload is the signed wire bytes every transport sends (p2pswarm.wire), never a pickle, so a bad rank's
bytes are validated and counted by wire.Inbox like any peer's, with expect_peer = the peer id that rank
announced. A rank that dies or hangs surfaces as one clear line (RankFailure) within the process-group
timeout, not a hang: each rank keeps a heartbeat counter in the rendezvous store, and the rank that sees a
collective fail reads them to name who stopped answering.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import msgpack
import torch
import torch.distributed as dist

from p2pswarm import wire
from p2pswarm.components import CommunicationManager, Coordinator, PeerInfo
from p2pswarm.errors import UserError
from p2pswarm.game import GameManager
from p2pswarm.identity import Identity, friendly_name
from p2pswarm.types import Group

log = logging.getLogger(__name__)

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Settings every rank must share: they decide how many collectives a run makes (rounds, stages) or
# whether ranks can use each other's rollouts at all (the swarm id).
LOCKSTEP_SETTINGS = ("experiment", "game", "rounds")


class RankFailure(UserError, RuntimeError):
    """Another rank died, hung or left, or the ranks disagree; the message is one line meant for the user."""


def missing_env(environ=os.environ) -> list[str]:
    return [v for v in REQUIRED_ENV if not environ.get(v)]


@dataclass(frozen=True)
class RankEnv:
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def _first_line(e: BaseException) -> str:
    """The gist of a (backend) error: first line, without gloo's '[path/file.cc:123] ' prefix, first sentence."""
    text = str(e).strip().splitlines()
    line = next((t for t in text if t.strip()), type(e).__name__)
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line.strip())
    return line.split(". ")[0][:300]


class TorchDistComm(CommunicationManager):
    """Rollout exchange between the ranks of one torch.distributed job (see the module docstring).

    Owns the default process group: initialises it from the torchrun environment (unless the program
    already did) and destroys it on close."""

    def __init__(self, identity: Identity, swarm: str, *, name: str, device: torch.device, timeout: float,
                 output: str = "", lockstep: dict[str, Any] | None = None, env: RankEnv | None = None):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.name = name
        self.output = output
        self.env = env or RankEnv.from_env()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.timeout = timeout
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self.inbox = wire.Inbox(swarm)
        self.sent = 0
        self.bytes_sent = 0
        self.last_collect_seconds = 0.0
        self._outbox: dict[tuple[int, int], bytes] = {}
        self._last_round: dict[str, int] = {}
        self._last_seen: dict[str, float] = {}
        self._failed: str | None = None
        self._closed = False
        self._store = None  # the rendezvous store (prefixed), for heartbeats and last words
        self._store_lost = False
        self.hosts_store = False  # rank 0 started without torchrun serves the store from this process
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.heartbeat_interval = min(2.0, max(0.5, timeout / 20))
        self.ranks: list[dict[str, Any]] = [{} for _ in range(self.world_size)]  # announcements, by rank
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            self._init_group()
        else:
            self._store = self._default_store()
        self.backend = dist.get_backend()
        self._start_heartbeat()
        self._announce(lockstep or {})

    # ---- set-up -----------------------------------------------------------------------------------
    def _init_group(self) -> None:
        e = self.env
        if _is_loopback(e.master_addr) and "GLOO_SOCKET_IFNAME" not in os.environ:
            # All ranks are on this machine: keep gloo's traffic on loopback instead of the interface the
            # hostname resolves to.
            lo = _loopback_interface()
            if lo:
                os.environ["GLOO_SOCKET_IFNAME"] = lo
        td = timedelta(seconds=self.timeout)
        backend, device_id = "gloo", None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            backend, device_id = "cpu:gloo,cuda:nccl", self.device  # headers on gloo, payloads on NCCL
        where = f"{e.master_addr}:{e.master_port}"
        try:
            store, _, _ = next(dist.rendezvous("env://", timeout=td))
        except (RuntimeError, ValueError) as exc:
            raise RankFailure(f"rank {e.rank}: could not reach the rendezvous store at {where} within "
                              f"{self.timeout:.0f} s (is torchrun / rank 0 running there?) [{_first_line(exc)}]") from None
        self._store = dist.PrefixStore("p2pswarm", store)
        self.hosts_store = e.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        try:
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=e.rank,
                                    world_size=e.world_size, timeout=td, device_id=device_id)
        except (RuntimeError, ValueError) as exc:
            raise RankFailure(f"rank {e.rank}: not all {e.world_size} ranks joined the process group at {where} "
                              f"within {self.timeout:.0f} s [{_first_line(exc)}]") from None

    @staticmethod
    def _default_store():
        try:
            return dist.PrefixStore("p2pswarm", dist.distributed_c10d._get_default_store())
        except Exception:  # noqa: BLE001 - a private API; without it failures are just named less precisely
            return None

    def _store_op(self, op: str, *args):
        """One store call; None once the store is gone (then never tried again: each failed call makes c10d
        print a long warning)."""
        store = self._store
        if store is None:
            return None
        try:
            return getattr(store, op)(*args)
        except Exception:  # noqa: BLE001 - rank 0 or the launcher that served it has exited
            self._store, self._store_lost = None, True
            return None

    def _start_heartbeat(self) -> None:
        key = f"hb/{self.rank}"

        def beat() -> None:
            while not self._beat_stop.wait(self.heartbeat_interval) and self._store is not None:
                self._store_op("add", key, 1)

        self._store_op("add", key, 1)
        self._mark("starting up")
        if self._store is None:
            return
        self._beat_thread = threading.Thread(target=beat, name=f"p2pswarm-heartbeat-{self.rank}", daemon=True)
        self._beat_thread.start()

    def _announce(self, lockstep: dict[str, Any]) -> None:
        me = {"peer": self.peer_id, "name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
              "output": self.output, "lockstep": lockstep}
        raw = self._all_gather_bytes(msgpack.packb(me), "the start-up exchange")
        ranks = []
        for r, data in enumerate(raw):
            try:
                info = msgpack.unpackb(data, raw=False)
                assert isinstance(info, dict) and isinstance(info.get("peer"), str) and isinstance(info.get("name"), str)
            except Exception:  # noqa: BLE001 - every rank sees the same bytes and fails the same way
                raise RankFailure(f"rank {r} sent a malformed start-up announcement (a different p2pswarm version?)") from None
            ranks.append(info)
        self.ranks = ranks
        owners: dict[str, int] = {}
        for r, info in enumerate(ranks):
            if info["peer"] in owners:
                raise RankFailure(f"ranks {owners[info['peer']]} and {r} have the same peer id {info['peer']}: "
                                  "give every rank its own identity file")
            owners[info["peer"]] = r
        for key in lockstep:
            values = [info.get("lockstep", {}).get(key) for info in ranks]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                raise RankFailure(f"the ranks disagree on '{key}' ({shown}); it must be the same on every rank")
        if self.rank == 0:
            log.info("torch.distributed swarm: %d ranks over %s", self.world_size, self.backend)
            for r, info in enumerate(ranks):
                log.info("  rank %d: %s (peer %s) on %s, output in %s", r, info["name"], info["peer"], info["host"],
                         info.get("output") or "-")

    # ---- collectives ------------------------------------------------------------------------------
    def _who(self, r: int) -> str:
        info = self.ranks[r] if r < len(self.ranks) else {}
        return f"rank {r} ({info['name']} on {info['host']})" if info.get("name") else f"rank {r}"

    @contextmanager
    def _collective(self, desc: str):
        """Run one collective; a backend error becomes a RankFailure that says which rank is to blame."""
        if self._failed:
            raise RankFailure(self._failed)
        if self._closed:
            raise RankFailure("the torch.distributed transport is closed")
        self._mark(f"waiting in {desc}")
        try:
            yield
        except RuntimeError as exc:  # torch.distributed.DistError and the backends' errors are RuntimeErrors
            self._failed = self._explain(exc, desc)
            self.note_exit(f"gave up in {desc}")
            raise RankFailure(self._failed) from None
        self._mark(f"busy since {desc}")

    def _mark(self, where: str) -> None:
        self._store_op("set", f"at/{self.rank}", where)

    def _explain(self, exc: BaseException, desc: str) -> str:
        """One line: which rank(s) stopped answering, left, or were too slow, and the backend's own words."""
        backend = _first_line(exc)
        timed_out = "timed out" in backend.lower() or "timeout" in backend.lower()
        head = (f"rank {self.rank}: process group timed out after {self.timeout:.0f} s waiting in {desc}" if timed_out
                else f"rank {self.rank}: {desc} failed")
        return f"{head}: {'; '.join(self._diagnose(desc))} [{backend}]"

    def _read(self, key: str) -> str | None:
        if not self._store_op("check", [key]):
            return None
        value = self._store_op("get", key)
        return None if value is None else value.decode(errors="replace")

    def _diagnose(self, desc: str) -> list[str]:
        others = [r for r in range(self.world_size) if r != self.rank]
        wait = 2.5 * self.heartbeat_interval  # every live rank beats at least twice meanwhile
        before = {r: self._store_op("add", f"hb/{r}", 0) for r in others}
        time.sleep(wait)
        after = {r: self._store_op("add", f"hb/{r}", 0) for r in others}
        notes = {r: n for r in others if (n := self._read(f"exit/{r}")) is not None}
        where = {r: w for r in others if (w := self._read(f"at/{r}")) is not None}
        if self._store is None:
            if not self._store_lost:
                return ["another rank stopped answering"]
            e = self.env
            return [f"the rendezvous store at {e.master_addr}:{e.master_port} does not answer either "
                    "(rank 0 or the launcher that served it is gone)"]
        out = []
        for r in others:
            if r in notes:
                out.append(f"{self._who(r)} left ({notes[r]})")
            elif after[r] == before[r]:
                out.append(f"{self._who(r)} stopped answering (no heartbeat for {wait:g} s: the process died or is frozen)")
            elif where.get(r, f"waiting in {desc}") != f"waiting in {desc}":
                out.append(f"{self._who(r)} is alive but did not get here ({where[r]}); raise dist_timeout "
                           f"(P2PSWARM_DIST_TIMEOUT, now {self.timeout:.0f} s) if ranks are this uneven")
        return out or ["every other rank still answers"]

    def _all_gather_ints(self, values: list[int], desc: str) -> list[list[int]]:
        t = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self._collective(desc):
            dist.all_gather(out, t)
        return [x.tolist() for x in out]

    def _all_gather_bytes(self, data: bytes, desc: str, max_bytes: int | None = None) -> list[bytes | None]:
        """Every rank's bytes (variable length: lengths first, then one padded uint8 all_gather)."""
        sizes = [s[0] for s in self._all_gather_ints([len(data)], desc)]
        return self._gather_payload(data, sizes, desc, max_bytes)

    def _gather_payload(self, data: bytes, sizes: list[int], desc: str, max_bytes: int | None) -> list[bytes | None]:
        """The padded all_gather. A rank whose size exceeds max_bytes sends nothing and comes back as None,
        so nobody allocates for it; every rank derives the same width from the same sizes."""
        cap = max_bytes if max_bytes is not None else max(sizes, default=0)
        width = max((n for n in sizes if n <= cap), default=0)
        if width == 0:
            return [b"" if n <= cap else None for n in sizes]
        buf = torch.zeros(width, dtype=torch.uint8)
        if 0 < len(data) <= cap:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        with self._collective(desc):
            dist.all_gather(out, buf)
        return [t[:n].cpu().numpy().tobytes() if n <= cap else None for t, n in zip(out, sizes)]

    # ---- CommunicationManager -----------------------------------------------------------------------
    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        """Sign now; the bytes travel in collect(), which every rank calls in step."""
        data = wire.encode(wire.RolloutBatch(self.swarm, round, stage, self.peer_id, groups), self.identity)
        self._outbox = {k: v for k, v in self._outbox.items() if k[0] >= round - 1}
        self._outbox[(round, stage)] = data
        self.sent += 1
        self.bytes_sent += len(data)

    def collect(self, round: int, stage: int) -> list[Group]:
        """All other ranks' groups for (round, stage). A collective: returns when every rank got here."""
        t0 = time.monotonic()
        self.inbox.forget_before(round - 2)
        data = self._outbox.pop((round, stage), b"")
        desc = f"the rollout exchange of round {round} stage {stage}"
        headers = self._all_gather_ints([round, stage, len(data)], desc)
        slots: dict[tuple[int, int], list[int]] = {}
        for r, h in enumerate(headers):
            slots.setdefault((h[0], h[1]), []).append(r)
        if len(slots) > 1:  # every rank sees the same headers, so every rank stops here with the same words
            shown = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} at round {k[0]} stage {k[1]}"
                              for k, rs in sorted(slots.items()))
            self._failed = (f"rank {self.rank}: the ranks are out of step ({shown}); they must run the same game "
                            f"with the same settings ({', '.join(LOCKSTEP_SETTINGS)})")
            raise RankFailure(self._failed)
        sizes = [h[2] for h in headers]
        payloads = self._gather_payload(data, sizes, desc, self.inbox.limits.max_bytes)
        groups: list[Group] = []
        now = time.time()
        for r, payload in enumerate(payloads):
            if r == self.rank:
                continue
            peer = self.ranks[r]["peer"]
            self._last_round[peer], self._last_seen[peer] = round, now
            if payload is None:
                self.inbox.drops["too_large"] += 1
                continue
            if not payload:
                continue  # that rank published nothing for this slot
            batch = self.inbox.accept(payload, current_round=round, expect_peer=peer, slot=(round, stage))
            if batch is None:
                continue
            groups.extend(batch.groups)
        self.last_collect_seconds = time.monotonic() - t0
        return groups

    def peers(self) -> list[PeerInfo]:
        out = []
        for r, info in enumerate(self.ranks):
            if r == self.rank or not info:
                continue
            p = info["peer"]
            out.append(PeerInfo(p, info.get("name") or friendly_name(p), self._last_round.get(p, -1),
                                self._last_seen.get(p, 0.0), self.inbox.groups_from[p]))
        return out

    def counters(self) -> dict[str, int]:
        return {"batches_sent": self.sent, "bytes_sent": self.bytes_sent, **self.inbox.counters()}

    def note_exit(self, reason: str) -> None:
        """Tell the other ranks (through the store) why this rank is leaving, so their error can say so.
        The first reason stays."""
        if self._store_op("check", [f"exit/{self.rank}"]) is False:
            self._store_op("set", f"exit/{self.rank}", reason[:500])

    def _linger(self) -> None:
        """This process serves the rendezvous store (rank 0 launched without torchrun): keep it up until
        every other rank has said goodbye or stopped beating, so that their last store calls (and their
        error diagnosis) do not hit a dead store. Bounded by the timeout."""
        deadline = time.monotonic() + self.timeout
        beats: dict[int, tuple[int | None, float]] = {}
        while time.monotonic() < deadline and self._store is not None:
            now = time.monotonic()
            pending = [r for r in range(self.world_size) if r != self.rank and not self._store_op("check", [f"exit/{r}"])]
            for r in pending:
                count = self._store_op("add", f"hb/{r}", 0)
                if r not in beats or beats[r][0] != count:
                    beats[r] = (count, now)
            if all(now - beats[r][1] > 2.5 * self.heartbeat_interval for r in pending):
                return  # everyone said goodbye, or the rest are gone
            time.sleep(0.1)

    def close(self) -> None:
        if self._closed:
            return
        self.note_exit("finished" if not self._failed else "gave up after an error")
        self._closed = True
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=2 * self.heartbeat_interval + 1)
        if self.hosts_store:
            self._linger()
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - exiting anyway
                log.debug("destroy_process_group: %s", e)


class TorchDistCoordinator(Coordinator):
    """The swarm's clock is rank 0's. Each decision is one all_gather of [round, stop wish] from every rank:
    rank 0's round wins (equivalent to a broadcast), and the same exchange lets any rank's stop request
    (Ctrl-C, SIGTERM) stop every rank after the same round."""

    def __init__(self, comm: TorchDistComm):
        self.comm = comm
        self._wants_stop: Callable[[], bool] = lambda: False
        self._stop: Callable[[], None] = lambda: None

    def bind(self, wants_stop: Callable[[], bool], stop: Callable[[], None]) -> None:
        self._wants_stop, self._stop = wants_stop, stop

    def _exchange(self, value: int, desc: str) -> list[list[int]]:
        rows = self.comm._all_gather_ints([value, int(self._wants_stop())], desc)
        asked = [r for r, row in enumerate(rows) if row[1]]
        if asked:
            if self.comm.rank == 0:
                log.info("rank(s) %s asked to stop: every rank stops now", ", ".join(map(str, asked)))
            self._stop()
        return rows

    def start_round(self, resume_from: int) -> int:
        """Rank 0 starts the swarm at the furthest resume point of any rank (a rank never goes back)."""
        rows = self._exchange(resume_from, "the start-round exchange")
        start = max(row[0] for row in rows)
        if self.comm.rank == 0 and len({row[0] for row in rows}) > 1:
            log.info("ranks resume at rounds %s; the swarm starts at round %d", [row[0] for row in rows], start)
        return start

    def next_round(self, finished: int) -> int:
        rows = self._exchange(finished + 1, f"the round clock after round {finished}")
        return max(rows[0][0], finished + 1)


class LockstepGameManager(GameManager):
    """A GameManager for ranks that run in lockstep. A stop request (signal, UI) is held until the next
    round boundary, where the coordinator shares it so that every rank stops after the same round: a rank
    that left mid-round would leave the others waiting in a collective. Pausing one rank would stall all
    of them, so pause is refused."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._stop_wanted = threading.Event()
        if isinstance(self.coordinator, TorchDistCoordinator):
            self.coordinator.bind(self._stop_wanted.is_set, super().request_stop)

    def request_stop(self) -> None:
        self._stop_wanted.set()

    def pause(self) -> None:
        log.warning("%s: pause is not available with --comm torch (ranks run in lockstep)", self.name)

    def run(self, rounds: int | None = None) -> None:
        try:
            super().run(rounds)
        except BaseException as e:
            if isinstance(self.comm, TorchDistComm) and not isinstance(e, RankFailure):
                self.comm.note_exit(f"failed: {type(e).__name__}: {_first_line(e)}")
            raise

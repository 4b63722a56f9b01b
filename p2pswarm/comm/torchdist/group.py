"""The process group a torch swarm runs on, and how its failures become one line.

A collective waits for every rank, so when one rank dies, freezes or falls behind, the others see only a
backend error or a timeout that names nobody. Each rank therefore keeps a heartbeat and a note of where it
is in the rendezvous store (which outlives a broken group), and the rank whose collective fails reads them
to say which rank is to blame and why.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from p2pswarm import validate as V
from p2pswarm.comm.torchdist.env import RankEnv, RankFailure, first_line, is_loopback, loopback_interface

log = logging.getLogger(__name__)


MAX_ANNOUNCEMENT = 64 * 1024  # bytes of a start-up announcement (real ones are ~300)


def parse_announcement(data: bytes | None) -> dict[str, Any]:
    """A rank's start-up announcement with every field checked, keeping only the fields known here; raises
    V.Invalid (or a msgpack error) otherwise. `name` (printable, 1..64), `host` (printable, 1..255) and `pid`
    are required; `peer` (an Ed25519 peer id), `output` (a path, at most 4096 characters, printable) and
    `lockstep` (plain data) are what TorchDistComm adds. Ranks are one trust domain, but a rank of another
    version or a broken one must stop the group with one line, not with a KeyError at the first failure."""
    if type(data) is not bytes:
        raise V.Invalid("announcement", "missing or over the size cap")
    info = V.mapping(msgpack.unpackb(data, raw=False), "announcement")
    out: dict[str, Any] = {"name": V.field(info, "name", V.name), "host": V.field(info, "host", V.name, 255),
                           "pid": V.field(info, "pid", V.integer, 0)}
    if "peer" in info:
        out["peer"] = V.peer_id(info["peer"], "peer")
    if "output" in info:
        out["output"] = V.text(info["output"], "output", 4096)
        if out["output"] and not out["output"].isprintable():
            raise V.Invalid("output", "has control characters")
    if "lockstep" in info:
        out["lockstep"] = V.plain(V.mapping(info["lockstep"], "lockstep"), "lockstep")
    return out


def parse_ints(row: Any, field: str, bounds: list[tuple[int, int]]) -> list[int]:
    """An int header row with each value in its [lo, hi) (V.Invalid otherwise)."""
    if not isinstance(row, list) or len(row) != len(bounds):
        raise V.Invalid(field, "wrong length")
    return [V.integer(v, field, lo, hi) for v, (lo, hi) in zip(row, bounds)]


class ProcessGroup:
    """The default process group, seen from one rank.

    Initialises it from the torchrun environment, or adopts one the program already made (then `owns_group`
    is False and close leaves it alone). The collectives (`announce`, `all_gather_ints`, `all_gather_bytes`,
    `gather_payload`) must be called by every rank in the same order. Each returns every rank's value, or
    raises RankFailure with one line naming the rank that died, hung, lagged or left (with its own reason).
    From then on the group is `failed` and every collective raises that same line at once: a rank never
    waits in a group that is already broken. `fail(why)` breaks it for a reason found above the collectives
    (the ranks are out of step).

    The rendezvous store holds, under `p2pswarm/`, per rank: `hb/<rank>` (a counter its heartbeat thread
    bumps), `at/<rank>` (waiting in, or busy since, which collective) and `exit/<rank>` (its goodbye note,
    written once by `note_exit`). Rank 0 started without torchrun serves that store from its own process
    (`hosts_store`), so its close lingers until the other ranks have left or gone silent.
    """

    def __init__(self, env: RankEnv, *, device: torch.device, timeout: float):
        self.env = env
        self.rank, self.world_size = env.rank, env.world_size
        self.timeout = timeout
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self.heartbeat_interval = min(2.0, max(0.5, timeout / 20))
        self.ranks: list[dict[str, Any]] = [{} for _ in range(self.world_size)]  # announcements, by rank
        self.failed: str | None = None  # the one-line verdict, once the group is broken
        self.closed = False
        self._store = None  # the rendezvous store (prefixed), for heartbeats and goodbye notes
        self._store_lost = False
        self.hosts_store = False
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            self._init_group()
        else:
            self._store = self._default_store()
        self.backend = dist.get_backend()
        self._start_heartbeat()

    # ---- set-up -----------------------------------------------------------------------------------
    def _init_group(self) -> None:
        e = self.env
        if is_loopback(e.master_addr) and "GLOO_SOCKET_IFNAME" not in os.environ:
            # All ranks are on this machine: keep gloo's traffic on loopback instead of the interface the
            # hostname resolves to.
            lo = loopback_interface()
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
                              f"{self.timeout:.0f} s (is torchrun / rank 0 running there?) [{first_line(exc)}]") from None
        self._store = dist.PrefixStore("p2pswarm", store)
        self.hosts_store = e.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        try:
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=e.rank,
                                    world_size=e.world_size, timeout=td, device_id=device_id)
        except (RuntimeError, ValueError) as exc:
            raise RankFailure(f"rank {e.rank}: not all {e.world_size} ranks joined the process group at {where} "
                              f"within {self.timeout:.0f} s [{first_line(exc)}]") from None

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

    def announce(self, me: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's announcement (`me` plus this host and pid), by rank: the start-up exchange. Each must
        carry a `name`, which the failure messages use from then on."""
        me = {**me, "host": socket.gethostname(), "pid": os.getpid()}
        raw = self.all_gather_bytes(msgpack.packb(me), "the start-up exchange", MAX_ANNOUNCEMENT)
        ranks = []
        for r, data in enumerate(raw):
            try:
                info = parse_announcement(data)
            except Exception as e:  # noqa: BLE001 - every rank sees the same bytes and fails the same way
                why = V.clip(str(e), 80) if isinstance(e, V.Invalid) else type(e).__name__
                raise RankFailure(f"rank {r} sent a malformed start-up announcement ({why}; a different p2pswarm "
                                  "version?)") from None
            ranks.append(info)
        self.ranks = ranks
        return ranks

    # ---- collectives ------------------------------------------------------------------------------
    @contextmanager
    def _collective(self, desc: str):
        """Run one collective; a backend error becomes a RankFailure that says which rank is to blame."""
        if self.failed:
            raise RankFailure(self.failed)
        if self.closed:
            raise RankFailure("the torch.distributed transport is closed")
        self._mark(f"waiting in {desc}")
        try:
            yield
        except RuntimeError as exc:  # torch.distributed.DistError and the backends' errors are RuntimeErrors
            self.failed = self._explain(exc, desc)
            self.note_exit(f"gave up in {desc}")
            raise RankFailure(self.failed) from None
        self._mark(f"busy since {desc}")

    def fail(self, why: str) -> RankFailure:
        """Break the group for `why` (one line): this and every later collective raise it. Returns the error
        for the caller to raise."""
        self.failed = why
        return RankFailure(why)

    def all_gather_ints(self, values: list[int], desc: str) -> list[list[int]]:
        """Every rank's `values` (the same length on every rank), by rank. `desc` names the exchange in errors."""
        t = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self._collective(desc):
            dist.all_gather(out, t)
        return [x.tolist() for x in out]

    def all_gather_bytes(self, data: bytes, desc: str, max_bytes: int | None = None) -> list[bytes | None]:
        """Every rank's bytes (variable length: lengths first, then one padded uint8 all_gather)."""
        sizes = [s[0] for s in self.all_gather_ints([len(data)], desc)]
        return self.gather_payload(data, sizes, desc, max_bytes)

    def gather_payload(self, data: bytes, sizes: list[int], desc: str, max_bytes: int | None) -> list[bytes | None]:
        """The padded all_gather, once every rank knows every rank's size. A rank whose size exceeds
        max_bytes sends nothing and comes back as None, so nobody allocates for it; every rank derives the
        same width from the same sizes."""
        cap = max_bytes if max_bytes is not None else max(sizes, default=0)
        ok = [type(n) is int and 0 <= n <= cap for n in sizes]  # a negative size would slice from the end
        width = max((n for n, good in zip(sizes, ok) if good), default=0)
        if width == 0:
            return [b"" if good else None for good in ok]
        buf = torch.zeros(width, dtype=torch.uint8)
        if 0 < len(data) <= cap:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        with self._collective(desc):
            dist.all_gather(out, buf)
        return [t[:n].cpu().numpy().tobytes() if good else None for t, n, good in zip(out, sizes, ok)]

    # ---- diagnosis --------------------------------------------------------------------------------
    def _mark(self, where: str) -> None:
        self._store_op("set", f"at/{self.rank}", where)

    def _who(self, r: int) -> str:
        info = self.ranks[r] if r < len(self.ranks) else {}
        return f"rank {r} ({info['name']} on {info['host']})" if info.get("name") else f"rank {r}"

    def _explain(self, exc: BaseException, desc: str) -> str:
        """One line: which rank(s) stopped answering, left, or were too slow, and the backend's own words."""
        backend = first_line(exc)
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

    def note_exit(self, reason: str) -> None:
        """Tell the other ranks (through the store) why this rank is leaving, so their error can say so.
        The first reason stays. Only its first sentence is kept: the others quote it inside their one line."""
        if self._store_op("check", [f"exit/{self.rank}"]) is False:
            self._store_op("set", f"exit/{self.rank}", reason.strip().split(". ")[0][:500])

    # ---- close ------------------------------------------------------------------------------------
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
        """Say goodbye ("finished", or that this rank gave up), stop the heartbeat, and destroy the group if
        this rank made it. Idempotent."""
        if self.closed:
            return
        self.note_exit("finished" if not self.failed else "gave up after an error")
        self.closed = True
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

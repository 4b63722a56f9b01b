"""TorchDistComm: a stage's rollout exchange as two collectives (sizes, then the padded signed bytes)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from p2pswarm import validate as V
from p2pswarm.comm.core import SignedTransport
from p2pswarm.comm.torchdist.env import RankEnv, RankFailure
from p2pswarm.comm.torchdist.group import ProcessGroup, parse_ints
from p2pswarm.components import PeerInfo
from p2pswarm.identity import Identity
from p2pswarm.types import Group

log = logging.getLogger(__name__)

# Settings every rank must share: they decide how many collectives a run makes (rounds, stages) or
# whether ranks can use each other's rollouts at all (the swarm id).
LOCKSTEP_SETTINGS = ("experiment", "game", "rounds")
HEADER = [(0, V.INT_MAX), (0, V.INT_MAX), (0, 2**62)]  # round, stage, payload size


class TorchDistComm(SignedTransport):
    """Rollout exchange between the ranks of one torch.distributed job (see the package docstring).

    publish(r, s) only signs: the bytes travel in collect(r, s), a collective every rank calls in step,
    which returns when every rank got there, with every other rank's valid groups (there is no partial
    exchange and no deadline of its own: the process group's timeout bounds it, as a RankFailure). Ranks
    that call it for different (round, stage) stop with "the ranks are out of step". A rank's bytes are
    checked against the peer id it announced at start-up, and a bad batch is dropped and counted under
    that rank like any peer's; a payload over the size cap is not even sent.

    At start-up the ranks announce themselves; two ranks with one identity, or ranks that disagree on
    LOCKSTEP_SETTINGS (`lockstep`), stop there. Owns the ProcessGroup (`group`): close() says goodbye
    to the other ranks and destroys the group if this rank made it. note_exit(why) leaves the note the
    other ranks' errors quote when this rank crashes.
    """

    def __init__(self, identity: Identity, swarm: str, *, name: str, device: torch.device, timeout: float,
                 output: str = "", lockstep: dict[str, Any] | None = None, env: RankEnv | None = None):
        super().__init__(identity, swarm, name=name, timeout=timeout)
        self.output = output
        self.group = ProcessGroup(env or RankEnv.from_env(), device=device, timeout=timeout)
        self.rank, self.world_size = self.group.rank, self.group.world_size
        self.ranks: list[dict[str, Any]] = []  # announcements, by rank
        self._outbox: dict[tuple[int, int], bytes] = {}
        self._last_round: dict[str, int] = {}
        self._last_seen: dict[str, float] = {}
        self._announce(lockstep or {})

    def _announce(self, lockstep: dict[str, Any]) -> None:
        ranks = self.group.announce({"peer": self.peer_id, "name": self.name, "output": self.output,
                                     "lockstep": lockstep})
        owners: dict[str, int] = {}
        for r, info in enumerate(ranks):
            if "peer" not in info:  # parse_announcement checked it is a peer id when present
                raise RankFailure(f"rank {r} sent a malformed start-up announcement (a different p2pswarm version?)")
            if info["peer"] in owners:
                raise RankFailure(f"ranks {owners[info['peer']]} and {r} have the same peer id {info['peer']}: "
                                  "give every rank its own identity file")
            owners[info["peer"]] = r
        for key in lockstep:
            values = [info.get("lockstep", {}).get(key) for info in ranks]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {V.clip(v, 60)}" for r, v in enumerate(values))
                raise RankFailure(f"the ranks disagree on '{key}' ({shown}); it must be the same on every rank")
        self.ranks = ranks
        for r, info in enumerate(ranks):
            if r != self.rank:  # so that per-peer counters are keyed by the ranks' names from the start
                self.names[info["peer"]] = info["name"]
        if self.rank == 0:
            log.info("torch.distributed swarm: %d ranks over %s", self.world_size, self.group.backend)
            for r, info in enumerate(ranks):
                log.info("  rank %d: %s (peer %s) on %s, output in %s", r, info["name"], info["peer"], info["host"],
                         info.get("output") or "-")

    # ---- CommunicationManager -----------------------------------------------------------------------
    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        """Sign now; the bytes travel in collect(), which every rank calls in step."""
        data = self.encode(round, stage, groups)
        self._outbox = {k: v for k, v in self._outbox.items() if k[0] >= round - 1}
        self._outbox[(round, stage)] = data
        self.count_sent(data)

    def collect(self, round: int, stage: int) -> list[Group]:
        """All other ranks' groups for (round, stage). A collective: returns when every rank got here."""
        t0 = self.begin_collect(round)
        data = self._outbox.pop((round, stage), b"")
        desc = f"the rollout exchange of round {round} stage {stage}"
        headers = self.group.all_gather_ints([round, stage, len(data)], desc)
        for r, h in enumerate(headers):  # every rank sees the same headers: all stop here, or none
            try:
                parse_ints(h, "header", HEADER)
            except V.Invalid as e:
                raise self.group.fail(f"rank {self.rank}: rank {r} sent a malformed header in {desc} ({e}); "
                                      "every rank must run the same p2pswarm version") from None
        slots: dict[tuple[int, int], list[int]] = {}
        for r, h in enumerate(headers):
            slots.setdefault((h[0], h[1]), []).append(r)
        if len(slots) > 1:  # every rank sees the same headers, so every rank stops here with the same words
            shown = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} at round {k[0]} stage {k[1]}"
                              for k, rs in sorted(slots.items()))
            raise self.group.fail(f"rank {self.rank}: the ranks are out of step ({shown}); they must run the same "
                                  f"game with the same settings ({', '.join(LOCKSTEP_SETTINGS)})")
        sizes = [h[2] for h in headers]
        payloads = self.group.gather_payload(data, sizes, desc, self.limits.max_bytes)
        groups: list[Group] = []
        now = time.time()
        for r, payload in enumerate(payloads):
            if r == self.rank:
                continue
            peer = self.ranks[r]["peer"]
            self._last_round[peer], self._last_seen[peer] = round, now
            if payload is None:
                self.drop(peer, "too_large")
                continue
            if not payload:
                continue  # that rank published nothing for this slot
            batch = self.accept(payload, round=round, stage=stage, sender=peer)
            if batch is not None:
                groups.extend(batch.groups)
        self.end_collect(t0)
        return groups

    def peers(self) -> list[PeerInfo]:
        return [self.peer_info(info["peer"], info.get("name", ""), self._last_round.get(info["peer"], -1),
                               self._last_seen.get(info["peer"], 0.0))
                for r, info in enumerate(self.ranks) if r != self.rank]

    def note_exit(self, why: str) -> None:
        self.group.note_exit(why)

    def close(self) -> None:
        if self.group.closed:
            return
        self.group.close()
        self.run_close_callbacks()

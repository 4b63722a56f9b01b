"""Which groups one update trains on: SAPO's selection protocols and the adaptive I/J split.

GRPOTrainer.select() delegates here, so the rules are one class that tests drive without a model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass

from p2pswarm.types import GameState, Group

log = logging.getLogger(__name__)

# Peers remembered for quality-aware sampling; the least recently seen is forgotten first, so a swarm of
# throwaway identities cannot grow the table without bound.
MAX_PEERS = 1024
# Weight of a peer whose groups never carried signal: small, not zero, so sampling stays well defined.
MIN_PEER_WEIGHT = 1e-3


@dataclass
class Selection:
    """What the last select() decided, for metrics and the bench."""

    local: int = 0          # local groups picked
    swarm: int = 0          # swarm groups picked
    signal: int = 0         # picked groups with a learning signal (under `paper`, flat local groups train too)
    j: int = 0              # the J cap used this round
    swarm_worth: float = 0.0  # adaptive: running signal rate of received swarm groups
    local_worth: float = 0.0  # adaptive: running signal rate of local groups
    fallback: bool = False  # adaptive: the swarm is judged useless, the update is I-only


class Selector:
    """Picks I local and J swarm groups from a round's GameState.

    Protocols (`selection`):
      - `p2p`: groups whose rewards are all equal (zero advantage, no gradient) are dropped on both sides
        before sampling, so every trained group carries signal.
      - `paper`: SAPO's controlled experiment (arXiv 2509.08721): only swarm groups are filtered; the I local
        groups are sampled from all of them, flat ones included (they train with advantage 0).

    Split (`split`):
      - `fixed`: I = local_groups, J = swarm_groups.
      - `adaptive`: B = local_groups + swarm_groups is the budget. Local groups with signal go first (they are
        on-policy); swarm groups with signal fill what is left, J = min(B - local signal groups, swarm signal
        groups). Swarm groups are sampled in proportion to their peer's worth, a running mean of the share of
        that peer's groups that carried signal (quality-aware sampling). When the running share of swarm
        groups with signal falls below `adaptive_min_worth` (a flat or silent swarm; groups the transport
        dropped as bad never arrive, so a hostile swarm looks silent) the update is I-only, I = B, until
        the swarm's groups carry signal again. Every received group is observed, picked or not, so a peer
        can earn its way back.

    Swarm groups are weighed per peer, not per group: a peer's groups share one unit of weight (its worth,
    under `adaptive`), so a peer that sends 256 groups gets no more of an update than one that sends 8.
    Before that, a peer's groups of the same task count once, and a group of more than G completions is cut
    to G of them at random (64 completions would otherwise weigh 16 of ours in the loss).

    select() never raises on what peers sent: a group is only ever weighed by `has_signal`, its `peer`
    string and its task's text, all already validated and scored by the receiver.
    """

    def __init__(self, settings, rng: random.Random):
        self.s = settings
        self.rng = rng
        self.peer_worth: dict[str, float] = {}
        self._seen: dict[str, int] = {}  # peer -> last round observed, for eviction
        self.swarm_worth: float | None = None
        self.local_worth: float | None = None
        self.fallback = False
        self.last = Selection()

    # ---- running worth --------------------------------------------------------------------------
    def _ema(self, old: float | None, x: float) -> float:
        a = self.s.adaptive_alpha
        return x if old is None else (1 - a) * old + a * x

    def observe(self, state: GameState) -> None:
        """Update the running worth of local groups, of the swarm and of each peer from one round."""
        local, swarm = state.local_groups(), state.swarm_groups()
        if local:
            self.local_worth = self._ema(self.local_worth, sum(g.has_signal for g in local) / len(local))
        # A round without swarm groups counts as worthless: silence and wholesale drops look the same here.
        self.swarm_worth = self._ema(self.swarm_worth, sum(g.has_signal for g in swarm) / len(swarm) if swarm else 0.0)
        by_peer: dict[str, list[bool]] = {}
        for g in swarm:
            by_peer.setdefault(g.peer, []).append(g.has_signal)
        for peer, sig in by_peer.items():
            # A new peer starts at the swarm's average, neither trusted nor shunned.
            prior = self.peer_worth.get(peer, self.swarm_worth)
            self.peer_worth[peer] = self._ema(prior, sum(sig) / len(sig))
            self._seen[peer] = state.round
        while len(self.peer_worth) > MAX_PEERS:
            oldest = min(self._seen, key=self._seen.__getitem__)
            del self.peer_worth[oldest], self._seen[oldest]

    # ---- selection ------------------------------------------------------------------------------
    def _swarm_pool(self, state: GameState) -> list[Group]:
        """The received groups an update may use: one per (peer, task), at most G completions each."""
        G = self.s.num_generations
        seen: set[tuple[str, str, str]] = set()
        pool = []
        for g in state.swarm_groups():
            key = (g.peer, g.task.dataset, g.task.question)
            if key in seen:
                continue
            seen.add(key)
            if len(g.completions) > G and len(g.rewards) == len(g.completions):
                keep = sorted(self.rng.sample(range(len(g.completions)), G))
                g = dataclasses.replace(g, completions=[g.completions[i] for i in keep],
                                        rewards=[g.rewards[i] for i in keep], sender_rewards=[])
            pool.append(g)
        return pool

    def _per_peer_sample(self, groups: list[Group], k: int, by_worth: bool) -> list[Group]:
        """k groups without replacement; each peer's groups share its weight (1, or its worth when by_worth),
        so what a peer gets does not grow with how many groups it sends (Efraimidis-Spirakis keys
        log(u) / w, which do not underflow for small weights; equal weights give a uniform sample)."""
        if k >= len(groups):
            return list(groups)
        count: dict[str, int] = {}
        for g in groups:
            count[g.peer] = count.get(g.peer, 0) + 1

        def weight(g: Group) -> float:
            w = max(self.peer_worth.get(g.peer, 0.0), MIN_PEER_WEIGHT) if by_worth else 1.0
            return w / count[g.peer]

        keyed = sorted(((math.log(1.0 - self.rng.random()) / weight(g), i) for i, g in enumerate(groups)),
                       reverse=True)
        return [groups[i] for _, i in keyed[:k]]

    def select(self, state: GameState) -> tuple[list[Group], list[Group]]:
        local_all = state.local_groups()
        local_signal = [g for g in local_all if g.has_signal]
        swarm = [g for g in self._swarm_pool(state) if g.has_signal]
        local_pool = local_signal if self.s.selection == "p2p" else local_all
        if self.s.split == "adaptive":
            self.observe(state)
            budget = self.s.local_groups + self.s.swarm_groups
            fallback = (self.swarm_worth or 0.0) < self.s.adaptive_min_worth
            if fallback != self.fallback:
                if fallback:
                    log.info("swarm groups carried signal in %.0f%% of cases lately (< %.0f%%): updates use local "
                             "groups only (split=adaptive)", 100 * (self.swarm_worth or 0.0),
                             100 * self.s.adaptive_min_worth)
                else:
                    log.info("swarm groups carry signal again (%.0f%%): updates mix them in (split=adaptive)",
                             100 * (self.swarm_worth or 0.0))
                self.fallback = fallback
            J = 0 if fallback else min(len(swarm), budget - min(len(local_signal), budget))
            I = budget - J
            if self.s.selection == "paper":
                # Signal groups first, then flat ones up to I: the budget was sized on the signal groups.
                if I <= len(local_signal):
                    picked_local = self.rng.sample(local_signal, I)
                else:
                    flat = [g for g in local_all if not g.has_signal]
                    picked_local = local_signal + self.rng.sample(flat, min(I - len(local_signal), len(flat)))
            else:
                picked_local = self.rng.sample(local_pool, min(I, len(local_pool)))
            picked_swarm = self._per_peer_sample(swarm, J, by_worth=True)
        else:
            J = self.s.swarm_groups
            picked_local = self.rng.sample(local_pool, min(self.s.local_groups, len(local_pool)))
            picked_swarm = self._per_peer_sample(swarm, J, by_worth=False)
        self.last = Selection(
            local=len(picked_local), swarm=len(picked_swarm),
            signal=sum(g.has_signal for g in picked_local) + len(picked_swarm), j=J,
            swarm_worth=self.swarm_worth or 0.0, local_worth=self.local_worth or 0.0, fallback=self.fallback,
        )
        return picked_local, picked_swarm

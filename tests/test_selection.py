"""The rules that pick an update's groups (p2pswarm/selection.py): protocols, adaptive J, fallback, peer preference."""

import logging
import random

import pytest

from helpers import make_settings
from p2pswarm import selection
from p2pswarm.selection import Selector
from p2pswarm.settings import SettingsError
from p2pswarm.types import GameState, Group, Task

TASK = Task("t0", "basic_arithmetic", "1+1", "2")
SIGNAL, FLAT = [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]


def groups(n: int, rewards: list[float], *, local: bool, peer: str = "me") -> list[Group]:
    """n groups of n different tasks (a peer's groups of one task count once)."""
    ids = [[1]] * len(rewards) if local else None
    groups.made = getattr(groups, "made", 0) + n
    return [Group(Task(f"t{groups.made + i}", "basic_arithmetic", f"{groups.made + i}+1", "2"), ["x"] * len(rewards),
                  peer=peer, rewards=list(rewards), completion_ids=ids) for i in range(n)]


def state(r: int, local: list[Group], swarm: list[Group]) -> GameState:
    s = GameState(r)
    s.add(0, local, swarm)
    return s


def selector(tmp_path, **kw) -> Selector:
    return Selector(make_settings(tmp_path, **kw), random.Random(0))


def test_p2p_drops_flat_groups_on_both_sides(tmp_path):
    sel = selector(tmp_path, local_groups=3, swarm_groups=3)
    st = state(0, groups(2, SIGNAL, local=True) + groups(6, FLAT, local=True),
               groups(2, SIGNAL, local=False, peer="a") + groups(6, FLAT, local=False, peer="a"))
    local, swarm = sel.select(st)
    assert len(local) == 2 and len(swarm) == 2
    assert all(g.has_signal for g in local + swarm)
    assert sel.last.signal == 4


def test_paper_filters_only_the_swarm_side(tmp_path):
    sel = selector(tmp_path, local_groups=6, swarm_groups=3, selection="paper")
    st = state(0, groups(2, SIGNAL, local=True) + groups(6, FLAT, local=True),
               groups(2, SIGNAL, local=False, peer="a") + groups(6, FLAT, local=False, peer="a"))
    local, swarm = sel.select(st)
    assert len(local) == 6  # flat local groups fill I: they train with advantage 0
    assert len(swarm) == 2 and all(g.has_signal for g in swarm)
    assert sel.last.signal == sum(g.has_signal for g in local) + 2


def test_adaptive_fills_the_budget_local_first(tmp_path):
    sel = selector(tmp_path, local_groups=4, swarm_groups=4, split="adaptive")
    # 3 local signal groups: the swarm tops up the other 5 of I + J = 8.
    local, swarm = sel.select(state(0, groups(3, SIGNAL, local=True) + groups(5, FLAT, local=True),
                                    groups(10, SIGNAL, local=False, peer="a")))
    assert (len(local), len(swarm), sel.last.j) == (3, 5, 5)
    # 8 local signal groups: nothing left for the swarm.
    local, swarm = sel.select(state(1, groups(8, SIGNAL, local=True), groups(10, SIGNAL, local=False, peer="a")))
    assert (len(local), len(swarm)) == (8, 0)
    # Fewer swarm signal groups than room: J is what exists.
    local, swarm = sel.select(state(2, groups(1, SIGNAL, local=True), groups(2, SIGNAL, local=False, peer="a")
                                    + groups(6, FLAT, local=False, peer="a")))
    assert (len(local), len(swarm)) == (1, 2)


def test_adaptive_under_the_paper_protocol_keeps_signal_local_groups_and_pads_with_flat_ones(tmp_path):
    sel = selector(tmp_path, local_groups=4, swarm_groups=4, split="adaptive", selection="paper")
    local, swarm = sel.select(state(0, groups(3, SIGNAL, local=True) + groups(5, FLAT, local=True),
                                    groups(2, SIGNAL, local=False, peer="a")))
    assert len(swarm) == 2 and len(local) == 6 and sum(g.has_signal for g in local) == 3


@pytest.mark.parametrize("swarm_kind", ["flat", "silent"])
def test_adaptive_falls_back_to_local_only_when_the_swarm_is_useless_and_recovers(tmp_path, caplog, swarm_kind):
    sel = selector(tmp_path, local_groups=4, swarm_groups=4, split="adaptive", adaptive_alpha=0.5)
    local_in = groups(6, SIGNAL, local=True) + groups(2, FLAT, local=True)
    useless = groups(12, FLAT, local=False, peer="a") if swarm_kind == "flat" else []
    caplog.set_level(logging.INFO, logger="p2pswarm.selection")
    r = 0
    while not sel.last.fallback and r < 50:  # the running worth decays geometrically
        sel.select(state(r, local_in, useless))
        r += 1
    assert sel.last.fallback and r < 50
    # I-only: a lone swarm signal group in a flat swarm is not enough to mix the swarm back in,
    # and the local side may use the whole budget.
    one = groups(1, SIGNAL, local=False, peer="a") + groups(11, FLAT, local=False, peer="a")
    local, swarm = sel.select(state(r, local_in, one))
    assert (len(local), len(swarm)) == (6, 0) and sel.last.fallback
    assert any("local groups only" in m for m in caplog.messages)
    good = groups(12, SIGNAL, local=False, peer="b")
    for k in range(1, 50):
        local, swarm = sel.select(state(r + k, local_in, good))
        if swarm:
            break
    assert not sel.last.fallback and len(swarm) == 2  # back to topping up: 8 - 6 local signal groups
    assert any("carry signal again" in m for m in caplog.messages)


def test_adaptive_prefers_peers_whose_groups_carried_signal(tmp_path):
    sel = selector(tmp_path, local_groups=4, swarm_groups=4, split="adaptive")
    picked = {"good": 0, "noisy": 0}
    for r in range(60):
        # Both peers send 4 groups with signal, but "noisy" also sends 12 flat ones: a quarter of its work is useful.
        swarm = groups(4, SIGNAL, local=False, peer="good") + groups(4, SIGNAL, local=False, peer="noisy") \
            + groups(12, FLAT, local=False, peer="noisy")
        _, chosen = sel.select(state(r, groups(4, SIGNAL, local=True) + groups(4, FLAT, local=True), swarm))
        assert len(chosen) == 4
        for g in chosen:
            picked[g.peer] += 1
    assert sel.peer_worth["good"] > 0.95 and 0.2 < sel.peer_worth["noisy"] < 0.3
    # A uniform sample would split 50/50; worth-weighted sampling favours "good" but still tries "noisy".
    assert picked["good"] > 0.7 * 240 and picked["noisy"] > 0


def test_fixed_split_samples_swarm_groups_uniformly(tmp_path):
    sel = selector(tmp_path, local_groups=4, swarm_groups=4)
    picked = {"good": 0, "noisy": 0}
    for r in range(60):
        swarm = groups(4, SIGNAL, local=False, peer="good") + groups(4, SIGNAL, local=False, peer="noisy") \
            + groups(12, FLAT, local=False, peer="noisy")
        for g in sel.select(state(r, groups(4, SIGNAL, local=True), swarm))[1]:
            picked[g.peer] += 1
    assert 0.4 * 240 < picked["good"] < 0.6 * 240
    assert sel.peer_worth == {}  # the fixed split keeps no per-peer state


@pytest.mark.parametrize("split", ["fixed", "adaptive"])
def test_a_peer_that_floods_groups_gets_no_more_than_its_share(tmp_path, split):
    """One peer sends 256 groups with signal, three honest peers 2 each: the flood is weighed as one peer."""
    sel = selector(tmp_path, local_groups=4, swarm_groups=4, split=split)
    picked = {"flood": 0, "honest": 0}
    for r in range(100):
        swarm = groups(256, SIGNAL, local=False, peer="flood")
        for p in ("a", "b", "c"):
            swarm += groups(2, SIGNAL, local=False, peer=p)
        for g in sel.select(state(r, groups(4, SIGNAL, local=True), swarm))[1]:
            picked["flood" if g.peer == "flood" else "honest"] += 1
    # by group count the flood would hold 256/262 of the picks; weighed per peer, about a quarter
    assert picked["flood"] + picked["honest"] == 400
    assert picked["flood"] < 0.4 * 400


def test_a_task_sent_twice_counts_once_and_big_groups_are_cut_to_G(tmp_path):
    sel = selector(tmp_path, local_groups=0, swarm_groups=8, num_generations=4)
    [g] = groups(1, SIGNAL, local=False, peer="p")
    twins = [Group(g.task, ["x"] * 4, peer="p", rewards=list(SIGNAL)) for _ in range(5)]
    big = Group(Task("big", "basic_arithmetic", "9+9", "18"), [f"c{i}" for i in range(64)], peer="q",
                rewards=[i / 63 for i in range(64)])  # all different: any 4 of them carry signal
    _, chosen = sel.select(state(0, [], twins + [big]))
    assert sorted(x.peer for x in chosen) == ["p", "q"]
    cut = next(x for x in chosen if x.peer == "q")
    assert len(cut.completions) == len(cut.rewards) == 4
    assert all(big.rewards[int(c[1:])] == r for c, r in zip(cut.completions, cut.rewards))  # pairs kept together
    assert len(big.completions) == 64  # the received group itself is untouched


def test_peer_table_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "MAX_PEERS", 3)
    sel = selector(tmp_path, local_groups=4, swarm_groups=4, split="adaptive")
    for r in range(10):
        sel.select(state(r, groups(2, SIGNAL, local=True), groups(1, SIGNAL, local=False, peer=f"p{r}")))
    assert sorted(sel.peer_worth) == ["p7", "p8", "p9"]


@pytest.mark.parametrize("kw", [{"selection": "sapo"}, {"split": "auto"}, {"adaptive_alpha": 0.0},
                                {"adaptive_min_worth": 1.5}])
def test_bad_selection_settings_are_refused(tmp_path, kw):
    with pytest.raises((SettingsError, ValueError)):
        make_settings(tmp_path, **kw)

"""The two rules every transport and every round clock share (p2pswarm/comm/core.py), pinned by tables."""

from __future__ import annotations

import pytest

from p2pswarm.comm.core import MonotonicClock, Progress, RoundRule, collect_need, quorum_reached, should_advance


# ---- when a collect has enough ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "want_peers, live, bridged, failed, need",
    [
        (0, 3, 0, 0, 3),  # every live peer expected to publish
        (2, 3, 0, 0, 2),  # collect_peers wins
        (2, 0, 0, 0, 2),  # ... even when nobody is live yet (the quorum the user asked for)
        (0, 0, 0, 0, 0),  # alone: nothing to wait for
        (0, 2, 3, 0, 5),  # a bridge among them relays 3 more
        (0, 3, 0, 1, 2),  # a peer whose payload failed no longer holds the collect up
        (0, 1, 0, 4, 0),  # more failures than peers: never negative
        (4, 3, 2, 2, 4),  # collect_peers is not reduced by failures
    ],
)
def test_collect_need(want_peers, live, bridged, failed, need):
    assert collect_need(want_peers=want_peers, live=live, bridged=bridged, failed=failed) == need
    assert quorum_reached(need, want_peers=want_peers, live=live, bridged=bridged, failed=failed)
    if need > 0:
        assert not quorum_reached(need - 1, want_peers=want_peers, live=live, bridged=bridged, failed=failed)


# ---- when a round is over -----------------------------------------------------------------------------------
P = Progress
NOW = 1000.0


@pytest.mark.parametrize(
    "clock, trainers, quorum, deadline, first_done_at, over, why",
    [
        (5, {}, 0, 60, None, False, "no trainers: nobody finished"),
        (5, {"a": P(5, 4), "b": P(5, 4)}, 0, 60, None, False, "nobody finished round 5"),
        (5, {"a": P(5, 5), "b": P(5, 4)}, 0, 60, NOW - 1, False, "1 of 2 active finished, deadline not passed"),
        (5, {"a": P(5, 5), "b": P(5, 5)}, 0, 60, NOW - 1, True, "every active trainer finished"),
        (5, {"a": P(5, 5), "b": P(5, 4)}, 0, 60, NOW - 60, True, "the deadline passed since the first finished"),
        (5, {"a": P(5, 5), "b": P(5, 4)}, 0, 60, NOW - 59.9, False, "just before the deadline"),
        (5, {"a": P(5, 5), "b": P(5, 4), "c": P(5, 4)}, 1, 60, NOW, True, "a quorum of 1"),
        (5, {"a": P(5, 5), "b": P(5, 4), "c": P(5, 4)}, 2, 60, NOW, False, "a quorum of 2, one finished"),
        (5, {"a": P(5, 5), "stuck": P(2, 1)}, 0, 60, NOW, True, "a trainer that stopped playing is not waited for"),
        (5, {"a": P(5, 5), "late": P(4, 3)}, 0, 60, NOW, False, "one that played the previous round is waited for"),
        (5, {"a": P(5, 5), "new": P(-1, -1)}, 0, 60, NOW, True, "a newcomer that has not played yet is not waited for"),
        (5, {"a": P(7, 6)}, 0, 60, NOW, True, "a trainer already past the round counts as finished"),
        (5, {"a": P(5, 4)}, 0, 60, NOW - 600, False, "the deadline alone never ends a round nobody finished"),
        (0, {"a": P(0, 0)}, 0, 60, NOW, True, "round 0, one trainer"),
    ],
)
def test_should_advance(clock, trainers, quorum, deadline, first_done_at, over, why):
    assert should_advance(clock, trainers, quorum=quorum, deadline=deadline, first_done_at=first_done_at,
                          now=NOW) is over, why


def test_the_round_rule_starts_the_deadline_when_the_first_trainer_finishes_and_resets_it_per_round():
    rule = RoundRule(quorum=0, deadline=10)
    waiting = {"a": P(3, 2), "b": P(3, 2)}
    assert not rule.step(3, waiting, now=0)
    assert rule.first_done_at is None  # nobody finished: the deadline has not started
    one = {"a": P(3, 3), "b": P(3, 2)}
    assert not rule.step(3, one, now=100)
    assert rule.first_done_at == 100
    assert not rule.step(3, one, now=109.9)
    assert rule.step(3, one, now=110)  # 10 s after the first finished, not after the round began
    assert rule.first_done_at is None
    # Round 4: a fresh deadline, and a quorum of the trainers it waits for ends it at once.
    assert not rule.step(4, {"a": P(4, 4), "c": P(4, 3)}, now=111)
    assert rule.first_done_at == 111
    assert rule.step(4, {"a": P(4, 4), "c": P(4, 4)}, now=112)


def test_a_trainer_that_held_a_round_to_its_deadline_is_not_waited_for_during_a_growing_number_of_rounds():
    rule = RoundRule(quorum=0, deadline=10)
    t = 0.0

    def play(clock, stalling_done=False):
        """Round `clock` with an honest `a` and a `stall` that claims to play it but never finishes."""
        nonlocal t
        stall = P(clock, clock) if stalling_done else P(clock, clock - 1)
        trainers = {"a": P(clock, clock), "stall": stall}
        t += 1
        if rule.step(clock, trainers, now=t):
            return "at once"
        t += 10
        assert rule.step(clock, trainers, now=t)
        return "deadline"

    assert play(0) == "deadline"  # the first time it costs a deadline...
    assert [play(r) for r in (1, 2)] == ["at once", "at once"]  # ...then it is not waited for 2 rounds
    assert play(3) == "deadline"  # waited for again, and it stalls again
    assert [play(r) for r in range(4, 8)] == ["at once"] * 4  # 4 rounds now
    assert play(8, stalling_done=True) == "at once"  # finishing still counts
    assert rule.stalls["stall"] == 2 and "a" not in rule.stalls


def test_a_clock_reading_never_goes_back():
    c = MonotonicClock()
    assert not c.known and c.round == -1
    assert c.see([3, 1]) == 3
    assert c.see([]) == 3
    assert c.see([2]) == 3  # a stale replica or a forged low record
    assert c.see([5]) == 5 and c.known


def test_a_clock_reading_past_any_round_a_swarm_plays_is_not_adopted():
    """A forged 2**31 - 1 would make a node play rounds every peer refuses, and its checkpoint would keep it there."""
    from p2pswarm.comm.core import ROUND_CEILING

    c = MonotonicClock()
    assert c.see([4, 2**31 - 1, ROUND_CEILING, "7", True]) == 4
    assert c.refused == 4
    assert c.see([ROUND_CEILING - 1]) == ROUND_CEILING - 1  # the last round it may play


def test_claims_move_a_keepers_clock_no_faster_than_the_pace_allows():
    """A keeper advances on heartbeats, which anyone can send: a flood of fresh identities that claim to have
    finished every round moves the clock one round per MIN_ROUND_SECONDS at most, saved up to the cap."""
    from p2pswarm.comm.core import MIN_ROUND_SECONDS, Pace

    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    clock = Clock()
    pace, rule, r = Pace(10_000, clock), RoundRule(fraction=0.75), 0
    honest = {"h": Progress(0, -1)}
    sybils = {f"s{i}": Progress(2**31 - 2, 2**31 - 2) for i in range(30)}
    for _ in range(40):  # 40 polls of 0.25 s
        clock.t += 0.25
        moved, most = 0, pace.allowance()
        while moved < most and rule.step(r, honest | sybils, now=clock.t):
            r, moved = r + 1, moved + 1
        pace.spend(moved)
    assert 0 < r <= 1 + 10 / MIN_ROUND_SECONDS  # 10 s of polls: not 40 x 10,000 rounds
    clock.t += 10 ** 6
    assert pace.allowance() == 10_000  # saved up, to the cap and no more

"""Several agents in one process form a real swarm: signed bytes through the hub, validated, trained on."""

from helpers import events, make_settings, metrics
from p2pswarm import wire
from p2pswarm.node import build_swarm, run_agents


def test_three_agents_learn_from_each_other(tmp_path):
    s = make_settings(tmp_path, agents=3, rounds=3, collect_timeout=60, checkpoint_every=2)
    agents = build_swarm(s)
    run_agents(agents)
    ids = {a.peer_id for a in agents}
    assert len(ids) == 3
    for a in agents:
        rows = metrics(a)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["swarm_groups_received"] == 2 * s.tasks_per_round for r in rows)  # both others, every round
        assert sum(r["swarm_groups"] for r in rows) > 0  # swarm groups were used in updates
        assert all(r["comm"]["batches_received"] >= 2 * (r["round"] + 1) for r in rows)
        received = [e for e in events(a) if e["kind"] == "rollouts_received"]
        assert all(set(e["peers"]) == ids - {a.peer_id} for e in received)
        assert a.run_dir.checkpoint_rounds() == [1, 2]  # every 2 rounds, and on exit


def test_two_stage_game_revises_with_the_swarms_answers(tmp_path):
    s = make_settings(tmp_path, agents=2, rounds=2, game="revise", collect_timeout=60)
    agents = build_swarm(s)
    run_agents(agents)
    for a in agents:
        received = [e for e in events(a) if e["kind"] == "rollouts_received"]
        assert sorted((e["round"], e["stage"]) for e in received) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(e["groups"] == s.tasks_per_round for e in received)
        assert len(metrics(a)) == 2


def test_publish_once_a_round_exchanges_every_stage_after_the_last(tmp_path):
    s = make_settings(tmp_path, agents=2, rounds=1, game="revise", collect_timeout=60, publish_frequency="round")
    agents = build_swarm(s)
    run_agents(agents)
    for a, other in zip(agents, reversed(agents)):
        received = [e for e in events(a) if e["kind"] == "rollouts_received"]
        assert [(e["round"], e["stage"]) for e in received] == [(0, 0), (0, 1)]
        assert all(e["groups"] == s.tasks_per_round and e["peers"] == [other.peer_id] for e in received)
        rows = metrics(a)
        assert rows[0]["swarm_groups_received"] == 2 * s.tasks_per_round


def test_hostile_bytes_are_dropped_and_counted_and_the_round_goes_on(tmp_path):
    s = make_settings(tmp_path, agents=2, rounds=2, collect_timeout=60)
    agents = build_swarm(s)
    hub = agents[0].comm.hub
    for r in range(2):
        hub.put(r, 0, "12D3KooWmallory", b"\x93garbage")  # not a member, so nobody waits for it
    honest = agents[1]
    forged = bytearray(wire.encode(wire.RolloutBatch(s.experiment, 0, 0, honest.peer_id, []), honest.comm.identity))
    forged[-3] ^= 0xFF  # break the signature
    hub.put(0, 0, "12D3KooWforger", bytes(forged))
    run_agents(agents)
    for a in agents:
        rows = metrics(a)
        assert len(rows) == 2
        comm = rows[-1]["comm"]
        assert comm["dropped_malformed"] == 2 and comm["dropped_bad_signature"] == 1
        assert all(r["swarm_groups_received"] == s.tasks_per_round for r in rows)

"""Rewards are never taken from a sender: every swarm task is regenerated from its recipe by the receiver."""

from __future__ import annotations

import copy
import json

import pytest

from helpers import make_settings
from p2pswarm import wire
from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.data.revise import ReviseData
from p2pswarm.identity import Identity
from p2pswarm.node import build_swarm, run_agents
from p2pswarm.types import Group


@pytest.fixture(scope="module")
def sender():
    return ReasoningGymData("easy", seed=7, peer="sender")


@pytest.fixture(scope="module")
def receiver():
    return ReasoningGymData("easy", seed=99, peer="receiver")


def test_an_honest_task_regenerates_to_the_receivers_own_copy(sender, receiver):
    for task in sender.round_tasks(3):
        own = receiver.rederive(copy.deepcopy(task))
        assert own is not None, task
        assert (own.question, own.answer, own.dataset) == (task.question, task.answer, task.dataset)
        assert own is not task and own.recipe == task.recipe


def test_a_task_from_a_peer_on_another_shipped_preset_is_verified(receiver):
    other = ReasoningGymData("rl-swarm", seed=3, peer="far")
    tasks = other.round_tasks(0)
    assert {t.dataset for t in tasks} - {s["name"] for s in receiver.specs}  # datasets the receiver never plays
    assert all(receiver.rederive(copy.deepcopy(t)) is not None for t in tasks)


def altered(task, **changes):
    t = copy.deepcopy(task)
    recipe = changes.pop("recipe", None)
    for k, v in changes.items():
        setattr(t, k, v)
    if recipe is not None:
        t.recipe = {**t.recipe, **recipe}
    return t


@pytest.mark.parametrize("how", [
    "falsified answer", "swapped question", "index of another task", "unknown config", "index out of range",
    "no recipe", "recipe of the wrong types", "unknown dataset", "bool index",
])
def test_a_task_that_does_not_regenerate_is_refused(sender, receiver, how):
    task, other = sender.round_tasks(5)[:2]
    bad = {
        "falsified answer": lambda: altered(task, answer=task.answer + "1"),
        "swapped question": lambda: altered(task, question=other.question),
        "index of another task": lambda: altered(task, recipe={"index": task.recipe["index"] + 1}),
        "unknown config": lambda: altered(task, recipe={"config": {**task.recipe["config"], "max_digits": 10**6}}),
        "index out of range": lambda: altered(task, recipe={"index": 10**12, "size": 10**13}),
        "no recipe": lambda: altered(task, recipe=None) if False else _without_recipe(task),
        "recipe of the wrong types": lambda: altered(task, recipe={"seed": "7", "index": 1.5}),
        "unknown dataset": lambda: altered(task, recipe={"dataset": "os.system"}),
        "bool index": lambda: altered(task, recipe={"index": True}),
    }[how]()
    assert receiver.rederive(bad) is None


def _without_recipe(task):
    t = copy.deepcopy(task)
    t.recipe = None
    return t


def test_a_held_out_question_is_never_taken_from_the_swarm(receiver):
    # A peer can name a held-out item by its recipe: the held-out pool is the same composite at another seed.
    held = receiver.eval_tasks()[0]
    from p2pswarm.data.reasoning_gym import HELDOUT_SEED, HELDOUT_SIZE, make_composite

    ds = make_composite(receiver.specs, HELDOUT_SEED, HELDOUT_SIZE)
    i = next(i for i in range(HELDOUT_SIZE) if ds[i]["question"] == held.question)
    name = ds[i]["metadata"]["source_dataset"]
    j = [s["name"] for s in receiver.specs].index(name)
    held.recipe = {"dataset": name, "config": receiver.specs[j]["config"], "seed": HELDOUT_SEED + j + 1,
                   "size": HELDOUT_SIZE, "index": i}
    assert receiver._regenerate(held.recipe).question == held.question  # the recipe is right...
    assert receiver.rederive(held) is None  # ...and still refused


def test_revise_stage_tasks_keep_the_recipe_and_are_checked_against_the_original():
    data = ReviseData("easy", seed=1, peer="a")
    from p2pswarm.types import GameState

    state = GameState(0)
    tasks = data.round_tasks(0)
    state.add(0, [Group(t, ["<answer>1</answer>", "<answer>2</answer>"], "a") for t in tasks], [])
    stage1 = data.stage_tasks(state, 1)
    other = ReviseData("easy", seed=2, peer="b")
    for t in stage1:
        own = other.rederive(copy.deepcopy(t))
        assert own is not None and own.answer == t.answer and own.question == t.question
    t = stage1[0]
    assert other.rederive(altered(t, answer=t.answer + "9")) is None
    assert other.rederive(altered(t, question=t.question.replace("Proposed answers", "Answers"))) is None
    assert other.rederive(altered(t, question=stage1[1].question)) is None


# ---- in a swarm ---------------------------------------------------------------------------------------------
def poisoned_batches(agent, mallory: Identity, swarm: str, rounds: int) -> dict[int, bytes]:
    """Mallory's batches: real tasks with the answer changed to match its wrong completions, properly signed."""
    out = {}
    for r in range(rounds):
        groups = []
        for t in agent.data.round_tasks(r)[:4]:
            t.answer = "12345"
            groups.append(Group(t, ["<answer>12345</answer>"] * 4, mallory.peer_id, rewards=[1.0] * 4))
        out[r] = wire.encode(wire.RolloutBatch(swarm, r, 0, mallory.peer_id, groups), mallory)
    return out


def test_poisoned_answers_never_reach_training_and_are_counted_under_the_sender(tmp_path):
    s = make_settings(tmp_path, agents=2, rounds=2, collect_timeout=60, ban_seconds=3600)  # a ban outlasts the test
    agents = build_swarm(s)
    hub = agents[0].comm.hub
    mallory = Identity.generate()
    hub.join(mallory.peer_id, "mallory")  # a member: honest peers wait for its batch
    for r, data in poisoned_batches(agents[0], mallory, s.experiment, 2).items():
        hub.put(r, 0, mallory.peer_id, data)
    run_agents(agents)
    for a in agents:
        rows = a.run_dir.read_metrics()
        assert [r["round"] for r in rows] == [0, 1]
        assert all(r["swarm_groups_received"] == s.tasks_per_round for r in rows)  # the honest peer's only
        comm = rows[-1]["comm"]
        row = comm["per_peer"][mallory.peer_id]  # under its authenticated peer id
        assert "groups" not in row and "batches" not in row  # nothing of it was accepted
        # Its round-0 batch's four poisoned groups are dropped (bad_task), the third one's strike bans it,
        # and while banned its batch of the next round is not even decoded.
        assert row["dropped_bad_task"] == comm["dropped_bad_task"] == 4
        assert row["bans"] == 1 and row["dropped_banned"] == 1
        received = [json.loads(l) for l in a.run_dir.events_path.read_text().splitlines()]
        assert all(mallory.peer_id not in e["peers"] for e in received if e["kind"] == "rollouts_received")


def test_a_data_manager_that_cannot_rederive_refuses_swarm_groups_unless_told_to_trust(tmp_path):
    class Opaque(ReasoningGymData):
        rederivable = False

    for trust in (False, True):
        s = make_settings(tmp_path / str(trust), agents=2, rounds=1, collect_timeout=60, accept_unverified_tasks=trust)
        agents = build_swarm(s)
        for a in agents:
            a.data = Opaque("easy", seed=a.s.seed, peer=a.peer_id)
            a.comm.check_tasks_with(a._task_check())
        run_agents(agents)
        for a in agents:
            row = a.run_dir.read_metrics()[-1]
            if trust:
                assert row["swarm_groups_received"] == s.tasks_per_round
            else:
                assert row["swarm_groups_received"] == 0
                assert row["comm"]["dropped_bad_task"] == s.tasks_per_round


def test_what_one_batch_can_make_the_receiver_re_derive_is_bounded(tmp_path):
    """Re-deriving costs the receiver CPU under its accept lock: a batch naming many generators is refused
    before any is built, and checking stops at the first forged task."""
    s = make_settings(tmp_path, agents=1, rounds=1)
    [agent] = build_swarm(s)
    comm, check, calls = agent.comm, agent._task_check(), []
    comm.check_tasks_with(lambda t: calls.append(t.question) or check(t))
    mallory = Identity.generate()
    tasks = agent.data.round_tasks(0) + agent.data.round_tasks(1)

    def batch(round, tasks):
        groups = [Group(t, ["<answer>1</answer>", "x"], mallory.peer_id, rewards=[1.0, 0.0]) for t in tasks]
        return wire.encode(wire.RolloutBatch(s.experiment, round, 0, mallory.peer_id, groups), mallory)

    # (one batch a round: a second one for the same round and stage would be a replay)
    # 64 tasks, each naming a generator of its own (another seed): dropped whole, nothing regenerated
    many = [altered(tasks[0], recipe={"seed": 1000 + i}) for i in range(64)]
    assert comm.accept(batch(0, many), round=0, stage=0, sender=mallory.peer_id) is None
    assert calls == [] and comm.per_peer[mallory.peer_id]["dropped_too_many_recipes"] == 1
    # honest tasks of a few generators, one drawn twice (an honest sampler may): all checked and kept
    honest = [copy.deepcopy(t) for t in tasks[1:5]] + [copy.deepcopy(tasks[1])]
    got = comm.accept(batch(1, honest), round=1, stage=0, sender=mallory.peer_id)
    assert got is not None and len(got.groups) == 5 and len(calls) == 5
    # a forged task first, then honest ones: one check, and the whole batch counted as bad tasks
    calls.clear()
    forged = [altered(tasks[2], answer="12345")] + [copy.deepcopy(t) for t in tasks[3:]]
    assert comm.accept(batch(2, forged), round=2, stage=0, sender=mallory.peer_id) is None
    assert calls == [tasks[2].question]
    assert comm.per_peer[mallory.peer_id]["dropped_bad_task"] == len(forged)

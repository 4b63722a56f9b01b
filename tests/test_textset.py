"""Text datasets: files in every format, a deterministic stream and held-out split, swarm tasks re-derived from the
receiver's own copy of the file, the three-stage critique game, and both games in an in-process swarm."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest

from helpers import events, make_settings, metrics
from p2pswarm.data.multistage import CritiqueData, critique_question, final_question
from p2pswarm.data.textset import DatasetError, TextData, shipped
from p2pswarm import wire
from p2pswarm.data.verifiers import VerifierError, get_verifier
from p2pswarm.identity import Identity
from p2pswarm.node import build_swarm, run_agents
from p2pswarm.rewards import extract_answer
from p2pswarm.types import GameState, Group

ROWS = [{"q": f"What is {i} + {i}?", "a": str(2 * i), "note": "x"} for i in range(50)]


def shipped_rows() -> dict[str, str]:
    """question -> answer, read straight from the shipped file (not through TextData)."""
    return {r["question"]: r["answer"] for r in map(json.loads, shipped().read_text().splitlines())}


# ---- reading files ---------------------------------------------------------------------------------------
def write(tmp_path, fmt: str):
    path = tmp_path / f"qa.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        path.write_text("q,a,note\n" + "".join(f"{r['q']},{r['a']},{r['note']}\n" for r in ROWS))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt == "hf":
        import datasets

        path = tmp_path / "qa-saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hf"])
def test_every_format_gives_the_same_rows(tmp_path, fmt):
    data = TextData(write(tmp_path, fmt), question="q", answer="a")
    assert sorted(data.rows) == sorted((r["q"], r["a"]) for r in ROWS)
    assert len(data.eval_tasks()) == 5  # a tenth held out
    assert data.digest == TextData(write(tmp_path, fmt), question="q", answer="a").digest


def test_a_saved_dataset_dict_holds_out_its_test_split(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:40]),
                          "test": datasets.Dataset.from_list(ROWS[40:])}).save_to_disk(str(path))
    data = TextData(path, question="q", answer="a")
    assert [t.question for t in data.eval_tasks()] == [r["q"] for r in ROWS[40:]]
    assert len(data.rows) == 40


@pytest.mark.parametrize("case,says", [
    ("missing", "no such file or folder"),
    ("suffix", "expected a .jsonl, .json, .csv, .parquet file"),
    ("columns", "no column 'question', 'answer' (it has a, note, q); set data_question / data_answer"),
    ("empty", "no rows with both a 'question' and an 'answer'"),
    ("blank answers", "no rows with both"),
    ("bad line", "line 2 is not JSON"),
    ("verifier", "not a dotted path 'module:function'"),
    ("verifier module", "cannot import 'nowhere_xyz'"),
])
def test_what_cannot_be_played_is_one_clear_line(tmp_path, case, says):
    path, kw = tmp_path / "d.jsonl", {}
    if case == "suffix":
        path = tmp_path / "d.txt"
        path.write_text("hello")
    elif case == "columns":
        path = write(tmp_path, "jsonl")
    elif case == "empty":
        path.write_text("")
    elif case == "blank answers":
        path.write_text('{"question": "q?", "answer": ""}\n{"question": "r?", "answer": null}\n')
    elif case == "bad line":
        path.write_text('{"question": "q?", "answer": "1"}\n{oops\n')
    elif case.startswith("verifier"):
        path = shipped()
        kw["verifier"] = "fuzzy" if case == "verifier" else "nowhere_xyz:check"
    with pytest.raises((DatasetError, VerifierError)) as e:
        TextData(path, **kw)
    assert says in str(e.value) and "\n" not in str(e.value)


# ---- the stream and the held-out split -------------------------------------------------------------------
def test_rounds_are_deterministic_per_peer_and_never_held_out():
    a, again, b = TextData(seed=1, peer="a"), TextData(seed=1, peer="a"), TextData(seed=1, peer="b")
    assert [t.question for t in a.round_tasks(3)] == [t.question for t in again.round_tasks(3)]
    assert [t.question for t in a.round_tasks(3)] != [t.question for t in b.round_tasks(3)]
    assert [t.question for t in a.round_tasks(3)] != [t.question for t in a.round_tasks(4)]
    held = {t.question for t in a.eval_tasks()}
    assert held == {t.question for t in TextData(seed=9, peer="z").eval_tasks()}  # the same on every peer
    assert not held & {t.question for r in range(50) for t in a.round_tasks(r)}


# ---- swarm tasks -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sender():
    return TextData(seed=7, peer="sender")


@pytest.fixture(scope="module")
def receiver():
    return TextData(seed=99, peer="receiver")


def test_an_honest_task_rederives_to_the_receivers_own_row(sender, receiver):
    for task in sender.round_tasks(0):
        own = receiver.rederive(copy.deepcopy(task))
        assert own is not None and (own.question, own.answer) == (task.question, task.answer)
        assert own is not task


def altered(task, **changes):
    t = copy.deepcopy(task)
    t.recipe = {**t.recipe, **changes.pop("recipe", {})}
    for k, v in changes.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("how", ["answer", "question", "index", "held-out index", "index out of range",
                                 "bool index", "hash", "hash of the wrong type", "no recipe", "stage"])
def test_a_task_that_does_not_rederive_is_refused(sender, receiver, how):
    task, other = sender.round_tasks(1)[:2]
    held = sender._held[0][0]
    held_index = [q for q, _ in sender.rows].index(held)
    bad = {
        "answer": lambda: altered(task, answer=task.answer + "0"),
        "question": lambda: altered(task, question=other.question),
        "index": lambda: altered(task, recipe={"index": other.recipe["index"]}),
        "held-out index": lambda: altered(task, question=held, answer=sender.rows[held_index][1],
                                          recipe={"index": held_index}),
        "index out of range": lambda: altered(task, recipe={"index": 10**9}),
        "bool index": lambda: altered(task, recipe={"index": True}),
        "hash": lambda: altered(task, recipe={"data": "0" * 64}),
        "hash of the wrong type": lambda: altered(task, recipe={"data": 5}),
        "no recipe": lambda: altered(task, recipe=None) if False else _no_recipe(task),
        "stage": lambda: altered(task, stage=1),
    }[how]()
    assert receiver.rederive(bad) is None


def _no_recipe(task):
    t = copy.deepcopy(task)
    t.recipe = None
    return t


def test_a_task_of_another_file_is_refused_and_said_once(tmp_path, receiver, caplog):
    other = TextData(write(tmp_path, "jsonl"), question="q", answer="a")
    with caplog.at_level(logging.WARNING, logger="p2pswarm.data.textset"):
        assert all(receiver.rederive(t) is None for r in range(3) for t in other.round_tasks(r))
    said = [r for r in caplog.records if r.levelno == logging.WARNING and other.digest[:12] in r.getMessage()]
    assert len(said) == 1


# ---- the three-stage game --------------------------------------------------------------------------------
def played(data, stage0: list[str], stage1: list[str]) -> tuple[list, list]:
    """Stage 1 and 2 tasks of a round where every task got the completions `stage0`, then `stage1`."""
    state = GameState(0)
    state.add(0, [Group(t, stage0, "p") for t in data.round_tasks(0)], [])
    s1 = data.stage_tasks(state, 1)
    state.add(1, [Group(t, stage1, "p") for t in s1], [])
    return s1, data.stage_tasks(state, 2)


def test_the_critique_stages_carry_the_candidates_and_votes():
    data = CritiqueData(seed=1, peer="a")
    s1, s2 = played(data, ["<answer>9</answer>", "<answer> 7 </answer>", "no tags", "<answer>9</answer>"],
                    ["<answer>2</answer>", "<answer>2</answer>", "<answer>0</answer>", "<answer>5</answer>"])
    source = data.round_tasks(0)[0]
    assert s1[0].question == critique_question(source.question, ["7", "9"])
    assert s1[0].question.endswith("\nProposed answers:\n1. 7\n2. 9\nWhich proposed answer is right? Give its number, or 0 if none is.")
    assert s2[0].question == final_question(source.question, ["7", "9"], [1, 0, 2])  # "5" is no candidate
    assert all(t.answer == s.answer and t.recipe == s.recipe for t, s in zip(s2, data.round_tasks(0)))


def test_critique_rewards():
    data = CritiqueData(seed=1, peer="a", verifier="numeric")
    task = critique_question("What is 2 + 2?", ["4.0", "5"])
    from p2pswarm.types import Task

    t = Task("t", "d", task, "4", metadata={"candidates": ["4.0", "5"]}, stage=1)
    score = lambda c: data.critique_score(t, c)  # noqa: E731
    assert score("<answer>1</answer>") == 1.0 and score("<answer>2</answer>") == 0.0
    assert score("<answer>0</answer>") == 0.0 and score("<answer>3</answer>") == 0.0 and score("1") == 0.0
    t.metadata = {"candidates": ["5"]}
    assert score("<answer>0</answer>") == 1.0


@pytest.mark.parametrize("stage", [1, 2])
def test_later_stage_tasks_rederive_and_tampering_is_refused(stage):
    data, other = CritiqueData(seed=1, peer="a"), CritiqueData(seed=2, peer="b")
    tasks = played(data, ["<answer>9</answer>", "<answer>7</answer>"], ["<answer>1</answer>", "<answer>0</answer>"])[stage - 1]
    for t in tasks:
        own = other.rederive(copy.deepcopy(t))
        assert own is not None and (own.question, own.answer, own.metadata) == (t.question, t.answer, t.metadata)
    t = tasks[0]
    for bad in [t.question.replace("1. 7", "3. 7"), t.question.replace("\n2. 9", "\n2. 9\n4. 1"),
                t.question + " ", t.question.replace("Proposed", "Suggested"), tasks[1].question,
                t.question.replace("none: 1", "none: 12345") if stage == 2 else t.question + "\n",
                t.question.replace("1: 1, 2: 0", "1: 1") if stage == 2 else t.question.replace("\n", "\n\n", 1)]:
        assert bad != t.question
        assert other.rederive(altered(t, question=bad)) is None
    assert other.rederive(altered(t, answer=t.answer + "1")) is None
    if stage == 1:  # which answers a peer asks to critique is its choice: they are scored against our truth
        own = other.rederive(altered(t, question=t.question.replace("\n2. 9", "\n2. 9\n3. 1")))
        assert own is not None and own.metadata == {"candidates": ["7", "9", "1"]}


# ---- in a swarm ------------------------------------------------------------------------------------------
def capture_states(agents) -> dict[str, GameState]:
    states: dict[str, list[GameState]] = {a.peer_id: [] for a in agents}
    for a in agents:
        a.after_rewards = states[a.peer_id].append
    return states


def test_a_text_swarm_plays_with_rewards_from_the_verifier(tmp_path):
    s = make_settings(tmp_path, agents=2, rounds=2, game="text", data_verifier="math", tasks_per_round=4,
                      collect_timeout=60)
    agents = build_swarm(s)
    states = capture_states(agents)
    run_agents(agents)
    truth, verify = shipped_rows(), get_verifier("math")
    for a in agents:
        rows = metrics(a)
        assert [r["round"] for r in rows] == [0, 1]
        assert all(r["swarm_groups_received"] == 4 and r["comm"].get("dropped_bad_task", 0) == 0 for r in rows)
        for state in states[a.peer_id]:
            groups = state.local_groups() + state.swarm_groups()
            assert len(state.swarm_groups()) == 4
            for g in groups:
                expected = [verify(x, truth[g.task.question]) if (x := extract_answer(c)) is not None else 0.0
                            for c in g.completions]
                assert g.rewards == expected
        assert any(g.rewards and max(g.rewards) == 1.0 for st in states[a.peer_id] for g in st.local_groups())


CANDIDATE = re.compile(r"^([0-9]{1,2})\. (.*)$", re.M)


def test_the_three_stage_game_plays_in_a_swarm_with_per_stage_rewards(tmp_path):
    s = make_settings(tmp_path, agents=2, rounds=2, game="text-critique", data_verifier="math", tasks_per_round=3,
                      collect_timeout=60)
    agents = build_swarm(s)
    states = capture_states(agents)
    run_agents(agents)
    truth, verify = shipped_rows(), get_verifier("math")

    def source_question(q: str) -> str:
        return q.split("\nProposed answers:")[0]

    def expected(task, completion) -> float:
        x = extract_answer(completion)
        right = truth[source_question(task.question)]
        if task.stage != 1:
            return 0.0 if x is None else verify(x, right)
        cands = [m.group(2) for m in CANDIDATE.finditer(task.question)]
        if x is None or not x.isdigit() or int(x) > len(cands):
            return 0.0
        if int(x) == 0:
            return float(all(verify(c, right) < 1 for c in cands))
        return verify(cands[int(x) - 1], right)

    for a, other in zip(agents, reversed(agents)):
        received = [e for e in events(a) if e["kind"] == "rollouts_received"]
        assert sorted((e["round"], e["stage"]) for e in received) == [(r, st) for r in range(2) for st in range(3)]
        assert all(e["groups"] == 3 and e["peers"] == [other.peer_id] for e in received)
        for state in states[a.peer_id]:
            for stage in range(3):
                assert len(state.local[stage]) == len(state.swarm[stage]) == 3
            # Stage 1 critiques the other peer's stage-0 answers; stage 2 reads the other peer's critiques.
            assert {source_question(g.task.question) for g in state.local[1]} == {g.task.question for g in state.swarm[0]}
            for g in state.local_groups() + state.swarm_groups():
                assert g.rewards == [expected(g.task, c) for c in g.completions]


def test_groups_of_a_peer_with_another_dataset_file_are_refused_and_counted(tmp_path, caplog):
    s = make_settings(tmp_path, agents=2, rounds=2, game="text", tasks_per_round=3, collect_timeout=60,
                      ban_strikes=0)  # an honest peer on another file is refused every round, never banned
    agents = build_swarm(s)
    hub = agents[0].comm.hub
    far, theirs = Identity.generate(), TextData(write(tmp_path, "jsonl"), question="q", answer="a", peer="far")
    hub.join(far.peer_id, "far")  # a member: the others wait for its batch
    for r in range(2):
        groups = [Group(t, ["<answer>0</answer>"] * 2, far.peer_id) for t in theirs.round_tasks(r)[:3]]
        hub.put(r, 0, far.peer_id, wire.encode(wire.RolloutBatch(s.experiment, r, 0, far.peer_id, groups), far))
    with caplog.at_level(logging.WARNING, logger="p2pswarm.data.textset"):
        run_agents(agents)
    for a in agents:
        rows = metrics(a)
        assert [r["round"] for r in rows] == [0, 1]
        assert all(r["swarm_groups_received"] == 3 for r in rows)  # the other arith peer's only
        comm = rows[-1]["comm"]
        assert comm["dropped_bad_task"] == comm["per_peer"][far.peer_id]["dropped_bad_task"] == 2 * 3
    said = [r for r in caplog.records if r.levelno == logging.WARNING and theirs.digest[:12] in r.getMessage()]
    assert len(said) == 2  # once by each peer, for six groups

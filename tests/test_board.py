"""The board-game environment: tic-tac-toe puzzles, their exact judge, re-derivation, and the game in a swarm."""

from __future__ import annotations

import copy
import json
import typing

import pytest

from helpers import HANG, cli, make_settings, run_process
from p2pswarm import wire
from p2pswarm.data import GAMES
from p2pswarm.data.board import (REWARD_DRAW, REWARD_LEGAL, REWARD_WIN, BoardRewards, TicTacToeData, judge, puzzles,
                                 render, value, winning_moves)
from p2pswarm.identity import Identity
from p2pswarm.rewards import extract_answer
from p2pswarm.types import Group, Task

# X to move; X threatens 1-2-3 and O threatens 4-5-6.
#   X X 3
#   O O 6
#   7 8 9
BOARD = "XX.OO...."


# ---- the judge ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, reward", [
    ("3", REWARD_WIN),  # three in a row
    (" 3\n", REWARD_WIN),  # the answer block's own whitespace
    ("6", REWARD_DRAW),  # blocks O, but then O blocks 3, X must block 7 (O's 3-5-7), and neither side has a threat
    ("7", REWARD_LEGAL),  # O completes 4-5-6
    ("9", REWARD_LEGAL),
    ("1", 0.0),  # occupied
    ("4", 0.0),
    ("0", 0.0),  # no such cell
    ("10", 0.0),
    ("33", 0.0),
    ("3 or 6", 0.0),  # one move, not a list
    ("3,6", 0.0),
    ("-3", 0.0),
    ("+3", 0.0),
    ("3.0", 0.0),
    ("cell 3", 0.0),
    ("three", 0.0),
    ("", 0.0),
    (None, 0.0),  # no answer block at all
    ("\uff13", 0.0),  # FULLWIDTH DIGIT THREE: int() reads it, the judge does not
    ("\u0663", 0.0),  # ARABIC-INDIC DIGIT THREE
    ("3\x00", 0.0),
    ("3" * 100_000, 0.0),
])
def test_the_judge_scores_hand_made_moves(reply, reward):
    assert judge(BOARD, reply) == reward


@pytest.mark.parametrize("board", [
    "XXXOO....",  # X has already won
    "XOXOXOOXO",  # full
    "XXXXXXXXX",  # impossible counts
    "OO.X.....",  # O moved first
    "xx.oo....",
    "XX.OO...",  # eight cells
    "XX.OO....\n",
    None, 3, ["X"] * 9, {"board": BOARD},
])
def test_a_board_that_is_no_live_position_scores_nothing(board):
    assert all(judge(board, str(m)) == 0.0 for m in range(1, 10))


def test_completions_are_scored_by_their_last_answer_block():
    task = TicTacToeData(seed=0)._task(BOARD, "t")
    rewards = BoardRewards()
    assert rewards.reward(task, "I think <answer>3</answer>") == REWARD_WIN
    assert rewards.reward(task, "<answer>7</answer> no, <answer>3</answer>") == REWARD_WIN
    assert rewards.reward(task, "<answer>3</answer") == 0.0  # not closed
    assert rewards.reward(task, "3") == 0.0  # no block
    assert rewards.reward(Task("t", "tictactoe", task.question, task.answer, metadata={}), "<answer>3</answer>") == 0.0
    assert BoardRewards(format_weight=0.5).reward(task, "<answer>3</answer>") == REWARD_WIN + 0.5


def test_every_puzzle_has_a_winning_move_and_its_answer_lists_exactly_those():
    train, heldout = puzzles()
    assert len(train) + len(heldout) == 2836  # every reachable position whose side to move can force a win
    assert not set(train) & set(heldout) and 200 <= len(heldout) <= 400
    data = TicTacToeData(seed=0)
    for board in train[::50] + heldout[::20]:
        assert value(board) == 1
        task = data._task(board, "t")
        wins = [int(c) for c in task.answer.split(",")]
        assert wins == winning_moves(board) and wins
        assert [m for m in range(1, 10) if judge(board, str(m)) == REWARD_WIN] == wins


def test_the_prompt_is_plain_text_the_embedded_tokenizer_encodes_exactly(policy_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    data = TicTacToeData(seed=0)
    task = data.round_tasks(0)[0]
    assert render(task.metadata["board"]) in task.question
    text = tok.apply_chat_template(data.messages(task), tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # nothing lost to an unknown token
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    for answer in ("<answer>", "</answer>", *map(str, range(1, 10))):
        assert len(tok(answer)["input_ids"]) == 1  # the answer is one cell token inside single-token tags


# ---- determinism, the held-out split, re-derivation ------------------------------------------------------------------
def test_rounds_are_deterministic_per_seed_round_and_peer():
    a, again = TicTacToeData(seed=5, peer="p"), TicTacToeData(seed=5, peer="p")
    assert [t.question for t in a.round_tasks(3)] == [t.question for t in again.round_tasks(3)]
    assert [t.recipe for t in a.round_tasks(3)] == [t.recipe for t in again.round_tasks(3)]
    assert [t.recipe for t in a.round_tasks(3)] != [t.recipe for t in a.round_tasks(4)]
    assert [t.recipe for t in a.round_tasks(3)] != [t.recipe for t in TicTacToeData(seed=5, peer="q").round_tasks(3)]


def test_the_held_out_split_is_shared_and_never_played():
    a, b = TicTacToeData(seed=1, eval_size=300), TicTacToeData(seed=2, eval_size=300)
    held = [t.metadata["board"] for t in a.eval_tasks()]
    assert held == [t.metadata["board"] for t in b.eval_tasks()] == list(puzzles()[1])
    played = {t.metadata["board"] for r in range(50) for t in a.round_tasks(r)}
    assert not played & set(held)
    assert len(TicTacToeData(seed=1, eval_size=20).eval_tasks()) == 20


@pytest.fixture(scope="module")
def sender_tasks():
    return TicTacToeData(seed=7, peer="sender").round_tasks(2)


def test_an_honest_task_regenerates_to_the_receivers_own_copy(sender_tasks):
    receiver = TicTacToeData(seed=99, peer="receiver")
    for task in sender_tasks:
        task.stage = 0
        own = receiver.rederive(copy.deepcopy(task))
        assert own is not None and own is not task
        assert (own.question, own.answer, own.metadata, own.recipe, own.task_id) == (
            task.question, task.answer, task.metadata, task.recipe, task.task_id)


def altered(task: Task, **changes) -> Task:
    t = copy.deepcopy(task)
    recipe = changes.pop("recipe", None)
    for k, v in changes.items():
        setattr(t, k, v)
    if recipe is not None:
        t.recipe = {**t.recipe, **recipe}
    return t


def _losing_cell(task: Task) -> str:
    board = task.metadata["board"]
    return next(str(m) for m in range(1, 10) if board[m - 1] == "." and str(m) not in task.answer.split(","))


@pytest.mark.parametrize("how", [
    "answer claims a losing cell", "answer lists every cell", "question of another position",
    "colours swapped", "index of another position", "seed of another stream",
    "another game", "no recipe", "recipe not a mapping", "seed a string", "bool index", "negative index",
    "index out of range", "float seed",
])
def test_a_tampered_task_is_refused(sender_tasks, how):
    task, other = sender_tasks[:2]
    assert task.metadata["board"] != other.metadata["board"]
    bad = {
        "answer claims a losing cell": lambda: altered(task, answer=_losing_cell(task)),
        "answer lists every cell": lambda: altered(task, answer="1,2,3,4,5,6,7,8,9"),
        "question of another position": lambda: altered(task, question=other.question),
        "colours swapped": lambda: altered(task, question=_other_side(task.question)),
        "index of another position": lambda: altered(task, recipe=dict(other.recipe)),
        "seed of another stream": lambda: altered(task, recipe={"seed": task.recipe["seed"] + 1}),
        "another game": lambda: altered(task, recipe={"game": "chess"}),
        "no recipe": lambda: _with_recipe(task, None),
        "recipe not a mapping": lambda: _with_recipe(task, ["tictactoe", 7, 1]),
        "seed a string": lambda: altered(task, recipe={"seed": "7"}),
        "bool index": lambda: altered(task, recipe={"index": True}),
        "negative index": lambda: altered(task, recipe={"index": -1}),
        "index out of range": lambda: altered(task, recipe={"index": 10**12}),
        "float seed": lambda: altered(task, recipe={"seed": 7.0}),
    }[how]()
    assert TicTacToeData(seed=99).rederive(bad) is None


def test_a_tampered_board_in_the_metadata_is_replaced_by_the_receivers_own(sender_tasks):
    task = sender_tasks[0]
    forged = altered(task, metadata={"board": "XX.OO....", "to_move": "X"})
    own = TicTacToeData(seed=99).rederive(forged)
    assert own is not None and own.metadata == task.metadata  # the judge reads the receiver's board


def _with_recipe(task: Task, recipe) -> Task:
    t = copy.deepcopy(task)
    t.recipe = recipe
    return t


def _other_side(question: str) -> str:
    """The same question with X and O swapped everywhere: the mirror position, played by the other side."""
    return question.translate(str.maketrans("XO", "OX"))


# ---- in a swarm ----------------------------------------------------------------------------------------------------
def test_the_game_plays_rounds_in_a_swarm_scored_by_the_receivers_judge(tmp_path):
    from p2pswarm.node import build_swarm, run_agents

    s = make_settings(tmp_path, agents=2, rounds=2, game="tictactoe", collect_timeout=60, tasks_per_round=4,
                      ban_seconds=3600)
    agents = build_swarm(s)
    states = {a.peer_id: [] for a in agents}
    for a in agents:
        a.after_rewards = states[a.peer_id].append  # the round's groups once every reward is in
    # Mallory, a member both peers wait for, sends real puzzles of its own with forged answers and questions.
    mallory = Identity.generate()
    hub = agents[0].comm.hub
    hub.join(mallory.peer_id, "mallory")
    honest = TicTacToeData(seed=1234, peer="mallory").round_tasks(0)[:3]
    assert len({t.metadata["board"] for t in honest}) == 3
    assert TicTacToeData(seed=1234).train_task(1234, honest[2].recipe["index"] + 1).question != honest[2].question
    forged = [altered(honest[0], answer=_losing_cell(honest[0])), altered(honest[1], question=honest[2].question),
              altered(honest[2], recipe={"index": honest[2].recipe["index"] + 1})]
    groups = [Group(t, [f"<answer>{_losing_cell(honest[0])}</answer>"] * 4, mallory.peer_id, rewards=[1.0] * 4)
              for t in forged]
    for r in range(2):
        batch = wire.RolloutBatch(s.experiment, r, 0, mallory.peer_id, groups)
        hub.put(r, 0, mallory.peer_id, wire.encode(batch, mallory))
    run_agents(agents)

    judge_of = TicTacToeData(seed=0)  # a third peer's view of every task: recipe -> board -> judge
    for a in agents:
        rows = a.run_dir.read_metrics()
        assert [r["round"] for r in rows] == [0, 1]
        assert all(r["swarm_groups_received"] == s.tasks_per_round for r in rows)  # the honest peer's, every round
        mallory_row = rows[-1]["comm"]["per_peer"][mallory.peer_id]
        assert mallory_row["dropped_bad_task"] == 3 and "groups" not in mallory_row
        for state in states[a.peer_id]:
            local, swarm = state.local_groups(), state.swarm_groups()
            assert len(local) == len(swarm) == s.tasks_per_round
            assert {g.peer for g in swarm} == {p for p in states if p != a.peer_id}
            for g in local + swarm:
                board = judge_of.train_task(g.task.recipe["seed"], g.task.recipe["index"]).metadata["board"]
                assert g.task.metadata["board"] == board
                assert g.rewards == [judge(board, extract_answer(c)) for c in g.completions]
                assert set(g.rewards) <= {0.0, REWARD_LEGAL, REWARD_DRAW, REWARD_WIN}


# ---- the game setting and the listing ----------------------------------------------------------------------------
def test_every_game_is_a_setting_value_with_a_builder_and_a_line():
    from p2pswarm.node import GAME_BUILDERS
    from p2pswarm.settings import Settings

    assert set(typing.get_args(Settings.model_fields["game"].annotation)) == set(GAMES) == set(GAME_BUILDERS)


def test_run_game_help_lists_the_games_and_an_unknown_game_names_them(tmp_path):
    res = run_process(cli("run", "--game", "help"), HANG)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(GAMES)
    assert all(summary in line for line, summary in zip(lines, GAMES.values()))
    res = run_process(cli("run", "--headless", "--game", "chess", "--set", f"runs_dir={tmp_path}"), HANG)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown game 'chess'" in res.stderr and all(name in res.stderr for name in GAMES)


def test_eval_scores_the_games_held_out_split_with_its_judge():
    res = run_process(cli("eval", "--set", "game=tictactoe", "--size", "20", "--json"), HANG)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(result) == {"eval_reward", "eval_tictactoe", "eval_answer_tagged"} and 0 <= result["eval_answer_tagged"] <= 1
    assert 0.0 <= result["eval_tictactoe"] == result["eval_reward"] <= REWARD_WIN

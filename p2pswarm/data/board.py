"""A board game with an exact judge: tic-tac-toe positions where the side to move can force a win.

Every reachable position of the game is enumerated and solved by minimax (5,478 positions, about a
tenth of a second, once per process), so the judge is exact: a move is scored by the value of the
position it leads to, not by comparison with one stored answer. A puzzle is a position whose side to
move can force a win: 2,836 of them, of which a fixed tenth, chosen by a hash of the position alone, is
the held-out split every peer shares and nobody trains on.

The text encoding is three rows of X, O and the numbers of the empty cells (1-9, row by row), and the
answer is one cell number: digits and capital letters the embedded policy's byte-level vocabulary holds
as single tokens.
"""

from __future__ import annotations

import logging
import random
import re
from functools import cache, cached_property

from p2pswarm import validate as V
from p2pswarm.components import DataManager, RewardManager
from p2pswarm.data.reasoning_gym import SYSTEM_PROMPT, stable_seed
from p2pswarm.rewards import extract_answer, format_score
from p2pswarm.types import Group, Task

log = logging.getLogger(__name__)

GAME = "tictactoe"
EMPTY = "."
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
_BOARD = re.compile(r"[XO.]{9}")
_MOVE = re.compile(r"[1-9]")  # str patterns: [1-9] is the ASCII digits only, never "５" or "٥"

# The judge's scale. A legal losing move earns a little over an illegal one: for a small policy, learning
# to name an empty cell is the first step to naming the right one.
REWARD_WIN = 1.0  # keeps the forced win
REWARD_DRAW = 0.5  # legal and not losing: the opponent can hold a draw
REWARD_LEGAL = 0.1  # legal, but the opponent can now force a win
# 0.0: no answer, not one cell number, or an occupied cell

HELDOUT_EVERY = 10  # one puzzle in ten is held out
STREAM_SIZE = 10_000_000  # recipe indices range over [0, STREAM_SIZE), like reasoning-gym's stream


# ---- the game and its solver ------------------------------------------------------------------------------
def winner(board: str) -> str | None:
    """'X' or 'O' when that side has three in a row, else None."""
    for a, b, c in LINES:
        if board[a] != EMPTY and board[a] == board[b] == board[c]:
            return board[a]
    return None


def to_move(board: str) -> str:
    return "X" if board.count("X") == board.count("O") else "O"


def play(board: str, cell: int) -> str:
    """The board after the side to move takes `cell` (1-9), which must be empty."""
    i = cell - 1
    return board[:i] + to_move(board) + board[i + 1:]


def legal_moves(board: str) -> list[int]:
    return [i + 1 for i, c in enumerate(board) if c == EMPTY]


def is_live(board: object) -> bool:
    """A reachable position still in play: nine X/O/. characters, X moved first, nobody has won, and a
    cell is empty. Anything else (a board from a peer, say) is no position the judge scores."""
    if not (isinstance(board, str) and _BOARD.fullmatch(board)):
        return False
    x, o = board.count("X"), board.count("O")
    return x - o in (0, 1) and winner(board) is None and EMPTY in board


@cache
def value(board: str) -> int:
    """The game-theoretic value for the side to move: 1 it can force a win, 0 a draw, -1 it loses."""
    if winner(board) is not None:
        return -1  # the previous move won
    if EMPTY not in board:
        return 0
    return max(-value(play(board, m)) for m in legal_moves(board))


def winning_moves(board: str) -> list[int]:
    """The cells that keep a forced win (empty unless the side to move can force one)."""
    return [m for m in legal_moves(board) if value(play(board, m)) == -1]


def judge(board: str, reply: str | None) -> float:
    """The reward of answering `reply` (the text inside <answer>) in `board`: REWARD_WIN, REWARD_DRAW,
    REWARD_LEGAL or 0. Never raises: a board that is no live position scores 0 whatever the reply."""
    if reply is None or not is_live(board):
        return 0.0
    move = reply.strip()
    if not _MOVE.fullmatch(move) or board[int(move) - 1] != EMPTY:
        return 0.0
    after = -value(play(board, int(move)))  # the mover's value once the move is made
    return {1: REWARD_WIN, 0: REWARD_DRAW, -1: REWARD_LEGAL}[after]


@cache
def puzzles() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training, held-out) puzzles: every reachable live position whose side to move can force a win, in a
    fixed order. Which split a position is in depends on the position only, so it is the same for all peers."""
    seen: set[str] = set()
    stack = [EMPTY * 9]
    while stack:
        board = stack.pop()
        if board in seen:
            continue
        seen.add(board)
        if is_live(board):
            stack.extend(play(board, m) for m in legal_moves(board))
    wins = sorted(b for b in seen if is_live(b) and value(b) == 1)
    heldout = tuple(b for b in wins if stable_seed(GAME, b) % HELDOUT_EVERY == 0)
    held = set(heldout)
    return tuple(b for b in wins if b not in held), heldout


def render(board: str) -> str:
    """Three rows, X and O as they are and an empty cell as its number."""
    cells = [c if c != EMPTY else str(i + 1) for i, c in enumerate(board)]
    return "\n".join(" ".join(cells[r * 3: r * 3 + 3]) for r in range(3))


def question(board: str) -> str:
    side = to_move(board)
    return (f"Tic-tac-toe. You play {side}. Empty cells show their number:\n{render(board)}\n"
            f"Which cell wins for {side}? Answer with the cell number.")


# ---- the DataManager and the RewardManager --------------------------------------------------------------
class TicTacToeData(DataManager):
    """Tic-tac-toe puzzles ("which cell wins?"), single stage.

    Item `index` of the stream of seed `seed` is a training puzzle picked by a hash of (seed, index); a
    round draws `tasks_per_round` indices from (seed, round, peer), so a restarted peer replays its rounds
    and peers with the same seed still play different puzzles. The recipe {"game", "seed", "index"}
    regenerates the task on any peer; `metadata["board"]` is what the judge reads, and on a swarm task it
    is always the receiver's own (rederive replaces the whole task).
    """

    rederivable = True

    def __init__(self, seed: int = 42, tasks_per_round: int = 8, peer: str = "", eval_size: int = 100,
                 system_prompt: str = SYSTEM_PROMPT):
        self.seed = seed
        self.tasks_per_round = tasks_per_round
        self.peer = peer
        self.eval_size = eval_size
        self.system_prompt = system_prompt

    @staticmethod
    def _task(board: str, task_id: str) -> Task:
        return Task(task_id=task_id, dataset=GAME, question=question(board),
                    answer=",".join(map(str, winning_moves(board))),
                    metadata={"board": board, "to_move": to_move(board)})

    def train_task(self, seed: int, index: int) -> Task:
        train, _ = puzzles()
        task = self._task(train[stable_seed(GAME, seed, index) % len(train)], f"{GAME}:{seed}:{index}")
        task.recipe = {"game": GAME, "seed": seed, "index": index}
        return task

    def round_tasks(self, round: int) -> list[Task]:
        rng = random.Random(stable_seed(self.seed, round, self.peer))
        return [self.train_task(self.seed, rng.randrange(STREAM_SIZE)) for _ in range(self.tasks_per_round)]

    def messages(self, task: Task) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task.question}]

    @cached_property
    def _heldout(self) -> list[Task]:
        return [self._task(b, f"eval:{i}") for i, b in enumerate(puzzles()[1])]

    def eval_tasks(self) -> list[Task]:
        return self._heldout[: self.eval_size]

    def rederive(self, task: Task) -> Task | None:
        try:
            recipe = V.mapping(task.recipe, "recipe")
            V.choice(recipe.get("game"), "recipe.game", (GAME,))
            seed = V.integer(recipe.get("seed"), "recipe.seed", -(2**63), 2**63)
            index = V.integer(recipe.get("index"), "recipe.index", 0, STREAM_SIZE)
        except V.Invalid as e:
            log.debug("refused a swarm task %r: %s", task.task_id[:40], e)
            return None
        own = self.train_task(seed, index)
        if own.question != task.question or own.answer != task.answer:
            return None  # another position, or another answer, than the recipe makes
        own.task_id, own.stage = task.task_id, task.stage
        return own


def score(task: Task, completion: str) -> float:
    """The judge's reward for a completion: its last <answer> as a move in the task's board."""
    board = task.metadata.get("board") if isinstance(task.metadata, dict) else None
    return judge(board, extract_answer(completion))


class BoardRewards(RewardManager):
    """The judge's reward (+ an optional weighted format reward, as ReasoningGymRewards adds it)."""

    def __init__(self, format_weight: float = 0.0):
        self.format_weight = format_weight

    def reward(self, task: Task, completion: str) -> float:
        r = score(task, completion)
        if self.format_weight:
            r += self.format_weight * format_score(completion)
        return r

    def score(self, groups: list[Group]) -> None:
        for g in groups:
            g.rewards = [self.reward(g.task, c) for c in g.completions]


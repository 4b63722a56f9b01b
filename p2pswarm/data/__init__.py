"""The games a node can play (the `game` setting), one line each: what `p2pswarm run --game help` prints.

Which DataManager and RewardManager each game builds is node.py's `GAME_BUILDERS`; this module stays free of
heavy imports so that the listing and the settings check answer at once.
"""

GAMES: dict[str, str] = {
    "reasoning-gym": "reasoning-gym tasks of the `preset` (arithmetic, counting, spelling...), one stage",
    "revise": "reasoning-gym tasks in two stages: answer, then revise given the answers the swarm proposed",
    "tictactoe": "tic-tac-toe puzzles: name the cell that keeps a forced win, scored by an exact solver",
    "text": "questions and answers from a file (`--data`, default the shipped arith.jsonl), scored by `data_verifier`",
    "text-critique": "a file's questions in three stages: answer, critique the swarm's answers, final answer",
}


def games_listing() -> str:
    """The games, one line each."""
    width = max(map(len, GAMES))
    return "\n".join(f"{name:<{width}}  {summary}" for name, summary in GAMES.items())

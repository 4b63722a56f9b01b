"""A three-stage game on a text dataset, like GenRL's multistage math: answer, critique, final answer.

    stage 0  answer     the dataset's question.
                        reward: the verifier's score of the answer against the row's answer.
    stage 1  critique   the question and the distinct answers one group proposed in stage 0 (the swarm's
                        groups; this peer's own when nobody else answered), numbered: which one is right?
                        The completion answers a number, or 0 for "none of them".
                        reward: the verifier's score of the candidate it picked; for 0, 1 when no
                        candidate is fully right, else 0. So the stage learns to judge others' answers.
    stage 2  final      the question, the candidates, and how the critics of stage 1 voted (the swarm's
                        stage-1 groups, else this peer's): the final answer.
                        reward: the verifier's score of the final answer against the row's answer.

State flows through GameState: stage_tasks(state, 1) reads the stage-0 groups (their completions become
the candidates), stage_tasks(state, 2) the stage-1 groups (their task holds the candidates in its
metadata, their completions are the votes). Every later-stage task keeps its row's recipe, and its
question is the row's question plus a block rendered from the candidates (and votes): a receiver
regenerates the row, parses the block, renders it again and refuses the task unless both match, so the
candidates it scores a critique against, and the answer, are its own.
"""

from __future__ import annotations

import re

from p2pswarm.data.textset import TextData
from p2pswarm.data.verifiers import squash
from p2pswarm.rewards import RewardFn, extract_answer
from p2pswarm.types import GameState, Group, Task

CANDIDATES_HEAD = "\nProposed answers:"
CRITIQUE_TAIL = "\nWhich proposed answer is right? Give its number, or 0 if none is."
VOTES_HEAD = "\nCritics chose: "
FINAL_TAIL = "\nGive the correct answer."
MAX_CANDIDATES = 8  # distinct answers of a group listed; G is usually smaller
MAX_CANDIDATE = 100  # characters of one candidate (a longer answer is left out, never cut)
MAX_VOTES = 9999
_CHOICE = re.compile(r"[0-9]{1,2}")
_LINE = re.compile(r"([0-9]{1,2})\. (.+)")
_VOTE = re.compile(r"(none|[0-9]{1,2}): ([0-9]{1,4})")


def candidates(group: Group) -> list[str]:
    """The distinct answers a group's completions propose, as listed in a critique question."""
    out = set()
    for c in group.completions:
        a = extract_answer(c)
        a = squash(a) if a is not None else ""
        if 0 < len(a) <= MAX_CANDIDATE and a.isprintable():
            out.add(a)
    return sorted(out)[:MAX_CANDIDATES]


def choice(completion: str, n: int) -> int | None:
    """The candidate number a critique picked (0: none), or None when it picked nothing valid."""
    a = extract_answer(completion)
    if a is None or not _CHOICE.fullmatch(a) or int(a) > n:
        return None
    return int(a)


def critique_question(question: str, cands: list[str]) -> str:
    return question + _listing(cands) + CRITIQUE_TAIL


def final_question(question: str, cands: list[str], votes: list[int]) -> str:
    tally = ", ".join(f"{'none' if k == 0 else k}: {n}" for k, n in enumerate(votes))
    return question + _listing(cands) + VOTES_HEAD + tally + FINAL_TAIL


def _listing(cands: list[str]) -> str:
    return CANDIDATES_HEAD + "".join(f"\n{i}. {c}" for i, c in enumerate(cands, 1))


def parse_block(question: str, source: str, stage: int) -> tuple[list[str], list[int] | None] | None:
    """The candidates (and, in stage 2, votes) a later-stage question lists after `source`, or None when it
    is not `source` followed by a block this game renders. The caller renders them again and compares."""
    tail = CRITIQUE_TAIL if stage == 1 else FINAL_TAIL
    if not (question.startswith(source + CANDIDATES_HEAD) and question.endswith(tail)):
        return None
    body = question[len(source) + len(CANDIDATES_HEAD): len(question) - len(tail)]
    votes = None
    if stage == 2:
        body, sep, tally = body.rpartition(VOTES_HEAD)
        if not sep:
            return None
        votes = []
        for k, item in enumerate(tally.split(", ")):
            m = _VOTE.fullmatch(item)
            if m is None or m.group(1) != ("none" if k == 0 else str(k)):
                return None
            votes.append(int(m.group(2)))
    cands = []
    for i, line in enumerate(body.split("\n")[1:], 1):
        m = _LINE.fullmatch(line)
        if m is None or int(m.group(1)) != i or len(m.group(2)) > MAX_CANDIDATE or not m.group(2).isprintable():
            return None
        cands.append(m.group(2))
    if (body and not body.startswith("\n")) or len(cands) > MAX_CANDIDATES:
        return None
    if votes is not None and (len(votes) != len(cands) + 1 or any(v > MAX_VOTES for v in votes)):
        return None
    return cands, votes


class CritiqueData(TextData):
    """The three-stage game of the module doc on TextData's rows, verifier and re-derivation."""

    num_stages = 3

    def stage_tasks(self, state: GameState, stage: int) -> list[Task]:
        if stage not in (1, 2):
            raise ValueError(f"the critique game has stages 0, 1 and 2, not {stage}")
        source = state.swarm.get(stage - 1) or state.local.get(stage - 1, [])
        tasks = []
        for g in source[: self.tasks_per_round]:
            t = g.task
            if stage == 1:
                cands = candidates(g)
                question = critique_question(t.question, cands)
                meta = {"candidates": cands}
            else:
                cands = list(t.metadata["candidates"])
                votes = [0] * (len(cands) + 1)
                for c in g.completions:
                    k = choice(c, len(cands))
                    if k is not None:
                        votes[k] = min(votes[k] + 1, MAX_VOTES)
                question = final_question(t.question[: -len(_listing(cands) + CRITIQUE_TAIL)], cands, votes)
                meta = {"candidates": cands, "votes": votes}
            tasks.append(Task(task_id=f"{t.task_id}:s{stage}"[:256], dataset=t.dataset, question=question,
                              answer=t.answer, metadata=meta, stage=stage, recipe=t.recipe))
        return tasks

    def rederive(self, task: Task) -> Task | None:
        if task.stage == 0:
            return super().rederive(task)
        if task.stage not in (1, 2):
            return None
        own = self.source_row(task)
        if own is None or own.answer != task.answer:
            return None
        parsed = parse_block(task.question, own.question, task.stage)
        if parsed is None:
            return None
        cands, votes = parsed
        if task.stage == 1:
            question, meta = critique_question(own.question, cands), {"candidates": cands}
        else:
            question, meta = final_question(own.question, cands, votes), {"candidates": cands, "votes": votes}
        if question != task.question:
            return None
        return Task(task_id=task.task_id, dataset=own.dataset, question=question, answer=own.answer,
                    metadata=meta, stage=task.stage, recipe=own.recipe)

    # ---- rewards -------------------------------------------------------------------------------------
    def critique_score(self, task: Task, completion: str) -> float:
        """Stage 1: the verifier's score of the picked candidate; 0 ("none") scores 1 when none is right."""
        cands = task.metadata.get("candidates", [])
        k = choice(completion, len(cands))
        if k is None:
            return 0.0
        if k > 0:
            return self.verify(cands[k - 1], task.answer)
        return 1.0 if all(self.verify(c, task.answer) < 1.0 for c in cands) else 0.0

    def stage_rewards(self) -> dict[int, RewardFn]:
        return {0: self.answer_score, 1: self.critique_score, 2: self.answer_score}

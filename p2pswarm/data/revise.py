"""A two-stage game: answer (stage 0), then revise (stage 1) given the answers the swarm proposed.

Stage-1 tasks are the swarm's stage-0 groups (this peer's own when it is alone): the question plus the
distinct answers proposed for it, to be checked and answered again. The reward is the same scorer
against the original task's answer, so the stage learns to pick and repair.
"""

from __future__ import annotations

from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.rewards import extract_answer
from p2pswarm.types import GameState, Task


REVISE_HEAD = "\nProposed answers: "
REVISE_TAIL = "\nCheck them and give the correct answer."


class ReviseData(ReasoningGymData):
    num_stages = 2

    def rederive(self, task: Task) -> Task | None:
        """Stage 1 keeps the original task's recipe: the receiver regenerates the original, checks that the
        question is it plus a list of proposed answers, and takes the answer from its own copy."""
        if task.stage != 1:
            return super().rederive(task)
        try:
            source = self._regenerate(task.recipe)
        except Exception:  # noqa: BLE001 - a generator's own error on a hostile recipe
            return None
        q = task.question
        if (source is None or source.question in self._heldout_questions or source.answer != task.answer
                or not (q.startswith(source.question + REVISE_HEAD) and q.endswith(REVISE_TAIL))):
            return None
        return Task(task_id=task.task_id, dataset=source.dataset, question=q, answer=source.answer,
                    metadata=source.metadata, stage=1, recipe=task.recipe)

    def stage_tasks(self, state: GameState, stage: int) -> list[Task]:
        if stage != 1:
            raise ValueError(f"the revise game has stages 0 and 1, not {stage}")
        source = state.swarm.get(0) or state.local.get(0, [])
        tasks = []
        for g in source[: self.tasks_per_round]:
            proposed = sorted({a for a in (extract_answer(c) for c in g.completions) if a})
            listed = ", ".join(proposed) if proposed else "none"
            tasks.append(
                Task(
                    task_id=f"{g.task.task_id}:revise",
                    dataset=g.task.dataset,
                    question=f"{g.task.question}{REVISE_HEAD}{listed}{REVISE_TAIL}",
                    answer=g.task.answer,
                    metadata=g.task.metadata,
                    stage=1,
                    recipe=g.task.recipe,
                )
            )
        return tasks

"""Tasks from reasoning-gym composite datasets: presets, a deterministic per-round stream and a held-out split."""

from __future__ import annotations

import hashlib
import json
import random
import tomllib
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from p2pswarm.components import DataManager
from p2pswarm.errors import UserError
from p2pswarm.types import Task

SYSTEM_PROMPT = "Solve the task. Give only the final answer, inside <answer> </answer>."

# All peers share the held-out pool: it depends on the preset only, never on a peer's seed.
HELDOUT_SEED = 1_000_003
HELDOUT_SIZE = 200
# Procedural datasets generate any index; the size only bounds the index range we draw from.
STREAM_SIZE = 10_000_000

PRESETS = ("easy", "rl-swarm")


class PresetError(UserError, ValueError):
    pass


def load_preset(name_or_path: str) -> list[dict[str, Any]]:
    """Dataset specs (name, weight, config) from a shipped preset name or a TOML/YAML/JSON file."""
    if name_or_path in PRESETS:
        text = resources.files("p2pswarm.data.presets").joinpath(f"{name_or_path}.toml").read_text()
        doc = tomllib.loads(text)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise PresetError(f"dataset preset {name_or_path!r} is neither one of {PRESETS} nor a file")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(path.read_text())
        elif path.suffix == ".json":
            doc = json.loads(path.read_text())
        else:
            doc = tomllib.loads(path.read_text())
    specs = doc.get("datasets") if isinstance(doc, dict) else None
    if not specs:
        raise PresetError(f"{name_or_path}: expected a non-empty 'datasets' list")
    out = []
    for i, s in enumerate(specs):
        if not isinstance(s, dict) or "name" not in s:
            raise PresetError(f"{name_or_path}: datasets[{i}] needs a 'name'")
        out.append({"name": s["name"], "weight": float(s.get("weight", 1.0)), "config": dict(s.get("config", {}))})
    return out


def jsonable(value: Any) -> Any:
    """Metadata as plain JSON/msgpack values (tuples become lists, unknown objects strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def make_composite(specs: list[dict[str, Any]], seed: int, size: int):
    import reasoning_gym
    from reasoning_gym.composite import DatasetSpec

    try:
        return reasoning_gym.create_dataset(
            "composite", seed=seed, size=size, datasets=[DatasetSpec(**s) for s in specs]
        )
    except Exception as e:  # reasoning-gym raises assorted errors for bad names/configs
        raise PresetError(f"reasoning-gym rejected the dataset preset: {e}") from e


def stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


class ReasoningGymData(DataManager):
    """A composite of reasoning-gym datasets. Each round draws `tasks_per_round` tasks at indices chosen
    from (seed, round, peer), so a restarted peer replays exactly the same tasks, and peers with the
    same seed still see different ones."""

    def __init__(
        self,
        preset: str = "easy",
        seed: int = 42,
        tasks_per_round: int = 8,
        peer: str = "",
        system_prompt: str = SYSTEM_PROMPT,
        eval_size: int = HELDOUT_SIZE,
    ):
        self.specs = load_preset(preset)
        self.seed = seed
        self.tasks_per_round = tasks_per_round
        self.peer = peer
        self.system_prompt = system_prompt
        self.eval_size = min(eval_size, HELDOUT_SIZE)
        self._train = make_composite(self.specs, seed, STREAM_SIZE)

    @cached_property
    def _heldout(self) -> list[Task]:
        ds = make_composite(self.specs, HELDOUT_SEED, HELDOUT_SIZE)
        return [self._task(ds[i], f"eval:{i}") for i in range(HELDOUT_SIZE)]

    @cached_property
    def _heldout_questions(self) -> frozenset[str]:
        return frozenset(t.question for t in self._heldout)

    def _task(self, entry: dict[str, Any], task_id: str) -> Task:
        meta = jsonable(entry.get("metadata", {}))
        return Task(
            task_id=task_id,
            dataset=str(meta.get("source_dataset", "")),
            question=str(entry["question"]),
            answer=str(entry["answer"]),
            metadata=meta,
        )

    def train_task(self, index: int) -> Task | None:
        """The training item at `index`, or None when its question is in the held-out split."""
        task = self._task(self._train[index], f"{self.seed}:{index}")
        return None if task.question in self._heldout_questions else task

    def sample_train(self, n: int, rng: random.Random) -> list[Task]:
        out: list[Task] = []
        while len(out) < n:
            task = self.train_task(rng.randrange(STREAM_SIZE))
            if task is not None:
                out.append(task)
        return out

    def round_tasks(self, round: int) -> list[Task]:
        return self.sample_train(self.tasks_per_round, random.Random(stable_seed(self.seed, round, self.peer)))

    def messages(self, task: Task) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task.question}]

    def eval_tasks(self) -> list[Task]:
        return self._heldout[: self.eval_size]

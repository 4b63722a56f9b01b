"""Tasks from reasoning-gym composite datasets: presets, a deterministic per-round stream and a held-out split."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import tomllib
from collections import OrderedDict
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from p2pswarm.components import DataManager
from p2pswarm.errors import UserError
from p2pswarm.types import Task

log = logging.getLogger(__name__)

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


def canonical(config: Any) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def known_specs(own: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(dataset, config) pairs whose tasks this peer regenerates: its own preset's and every shipped preset's.
    A recipe may name only these: its config becomes a generator's arguments, and an arbitrary one could
    ask for a task that takes minutes or gigabytes to make."""
    out = {(s["name"], canonical(s["config"])) for s in own}
    for name in PRESETS:
        out |= {(s["name"], canonical(s["config"])) for s in load_preset(name)}
    return out


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
        self._known = known_specs(self.specs)
        self._generators: OrderedDict[tuple, Any] = OrderedDict()  # recipe generators, least recently used first
        self._generators_lock = threading.Lock()

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
        if task.question in self._heldout_questions:
            return None
        task.recipe = self._recipe(task.dataset, index)
        return task

    def _recipe(self, dataset: str, index: int) -> dict[str, Any] | None:
        """How the composite made item `index` of `dataset`: the sub-dataset's own seed and size (as
        reasoning_gym.composite derives them) and the index, so that one generator remakes it."""
        for i, spec in enumerate(self.specs):
            if spec["name"] == dataset:
                config = {k: v for k, v in spec["config"].items() if k not in ("seed", "size")}
                return {"dataset": dataset, "config": config, "seed": int(spec["config"].get("seed", self.seed + i + 1)),
                        "size": int(spec["config"].get("size", STREAM_SIZE)), "index": index}
        return None

    # ---- re-deriving swarm tasks ----------------------------------------------------------------------
    rederivable = True

    def rederive(self, task: Task) -> Task | None:
        try:
            own = self._regenerate(task.recipe)
        except Exception as e:  # noqa: BLE001 - a generator's own error on a hostile recipe: refuse the task
            log.debug("recipe of %r did not regenerate: %s: %s", task.task_id[:40], type(e).__name__, e)
            return None
        if (own is None or own.question != task.question or own.answer != task.answer
                or own.question in self._heldout_questions):
            return None  # altered, swapped, or another task's index; the held-out split is never trained on
        own.task_id, own.stage = task.task_id, task.stage
        return own

    def _regenerate(self, recipe: Any) -> Task | None:
        if not isinstance(recipe, dict):
            return None
        name, config, seed, size, index = (recipe.get(k) for k in ("dataset", "config", "seed", "size", "index"))
        if not (isinstance(name, str) and isinstance(config, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in (seed, size, index))):
            return None
        key = canonical(config)
        if (name, key) not in self._known or not (0 <= seed < 2**63 and 0 <= index < size <= STREAM_SIZE):
            return None
        with self._generators_lock:  # transports call this from their own threads
            gen = self._generators.get((name, key, seed, size))
            if gen is None:
                import reasoning_gym

                gen = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
                self._generators[(name, key, seed, size)] = gen
                if len(self._generators) > 256:
                    self._generators.popitem(last=False)
            else:
                self._generators.move_to_end((name, key, seed, size))
            entry = gen[index]
        own = self._task(entry, "")
        own.recipe = recipe
        return own

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

"""Tasks from a question/answer file: JSONL, JSON, CSV, Parquet or a `datasets` save_to_disk folder.

A row's recipe is the dataset's content hash (the file's bytes plus the two column names) and the row's
index, so every peer with the same file regenerates a swarm task itself, question and answer, and scores
it against its own answer; a peer with another file (another hash) refuses such groups.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import threading
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from p2pswarm import validate as V
from p2pswarm.components import DataManager
from p2pswarm.data.reasoning_gym import HELDOUT_SIZE, SYSTEM_PROMPT, stable_seed
from p2pswarm.data.verifiers import Verifier, get_verifier
from p2pswarm.errors import UserError
from p2pswarm.rewards import RewardFn, extract_answer
from p2pswarm.types import Task

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1  # of a file without its own test split, at most HELDOUT_SIZE rows
HELDOUT_SPLITS = ("test", "validation", "valid", "eval")  # a saved DatasetDict's held-out split, first found
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_FOREIGN_LOGGED = 16  # distinct foreign dataset hashes named in the log; a hostile peer can invent many


class DatasetError(UserError, ValueError):
    pass


def shipped(name: str = "arith.jsonl") -> Path:
    """A dataset that ships with p2pswarm (scripts/make_arith_dataset.py makes arith.jsonl)."""
    return Path(str(resources.files("p2pswarm.data.datasets").joinpath(name)))


# ---- reading a file --------------------------------------------------------------------------------------
def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative path and bytes, in path order; the
    `cache-*` files `datasets` writes beside its data are left out)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "cache-")))
    for p in files:
        if p is not path:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _records(path: Path) -> tuple[list[dict], list[dict] | None]:
    """The rows of a file (dicts), and a folder's own held-out split when it has one."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets' own errors for a folder it did not write
            raise DatasetError(f"dataset {path}: not a folder saved by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            held = next((n for n in HELDOUT_SPLITS if n in ds), None)
            rest = [n for n in ds if n != held]
            if not rest:  # a test split alone is what there is to train on
                return ds[held].to_list(), None
            train = "train" if "train" in rest else rest[0]
            return ds[train].to_list(), (ds[held].to_list() if held else None)
        return ds.to_list(), None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), None
        except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file
            raise DatasetError(f"dataset {path}: not a readable Parquet file ({e})") from None
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines())), None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"dataset {path}: not JSON ({e})") from None
        return [r for r in rows if isinstance(r, dict)], None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"dataset {path}: line {n} is not JSON ({e})") from None
    return [r for r in rows if isinstance(r, dict)], None


def _pairs(rows: list[dict], question: str, answer: str, path: Path) -> list[tuple[str, str]]:
    if rows:
        columns = {k for r in rows for k in r}
        missing = [c for c in (question, answer) if c not in columns]
        if missing:
            raise DatasetError(f"dataset {path}: no column {', '.join(map(repr, missing))} (it has "
                               f"{', '.join(sorted(map(str, columns)))[:200]}); set data_question / data_answer")
    pairs = [(_text(r.get(question)), _text(r.get(answer))) for r in rows]
    return [(q, a) for q, a in pairs if q and a]


def _text(v: Any) -> str:
    """A cell as text: 12 and 12.0 as a user wrote them would be read ("12", "12.0"); None is empty."""
    if v is None:
        return ""
    return (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)).strip()


def load_dataset(path: Path, question: str = "question", answer: str = "answer") -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None, str]:
    """(question, answer) rows, the file's own held-out rows (or None), and the dataset's hash (the file's
    content hash and the column names). DatasetError, one line, for a missing file, a format it does not
    read, missing columns, or no row with both a question and an answer."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path}: no such file or folder")
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise DatasetError(f"dataset {path}: expected a {', '.join(SUFFIXES)} file or a folder saved by "
                           "datasets' save_to_disk")
    rows, held = _records(path)
    pairs = _pairs(rows, question, answer, path)
    if not pairs:
        raise DatasetError(f"dataset {path}: no rows with both a {question!r} and an {answer!r}")
    held_pairs = _pairs(held, question, answer, path) if held else None
    digest = hashlib.sha256(f"{content_hash(path)}\0{question}\0{answer}".encode()).hexdigest()
    return pairs, held_pairs or None, digest


# ---- the DataManager -------------------------------------------------------------------------------------
class TextData(DataManager):
    """Question/answer rows of a dataset file, answered in one stage and scored by a verifier
    (p2pswarm/data/verifiers.py) on the completion's last <answer>.

    Rounds: each draws `tasks_per_round` training rows at random from (seed, round, peer), as
    ReasoningGymData does. The held-out split is the file's own test split (a saved DatasetDict's
    `test`/`validation`), else 10% of the rows (at most 200) picked from the dataset's hash: the same
    rows on every peer with the file, never trained on, nor taken from the swarm.

    Swarm tasks: recipe {"data": <dataset hash>, "index": <row>}; rederive() gives this peer's own row when
    the hash is its own and the question and answer are that row's; another hash is refused, and named
    in the log once.
    """

    rederivable = True

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        question: str = "question",
        answer: str = "answer",
        verifier: str = "exact",
        tolerance: float = 1e-6,
        seed: int = 42,
        tasks_per_round: int = 8,
        peer: str = "",
        system_prompt: str = SYSTEM_PROMPT,
        eval_size: int = HELDOUT_SIZE,
    ):
        self.path = Path(path) if path is not None else shipped()
        self.name = self.path.stem[:64] or "dataset"
        self.rows, held, self.digest = load_dataset(self.path, question, answer)
        self.verify: Verifier = get_verifier(verifier, tolerance)
        self.verifier = verifier
        self.seed, self.tasks_per_round, self.peer = seed, tasks_per_round, peer
        self.system_prompt = system_prompt
        self.eval_size = min(eval_size, HELDOUT_SIZE)
        if held is None:
            n = min(int(len(self.rows) * HELDOUT_FRACTION), HELDOUT_SIZE)
            picked = random.Random(stable_seed(self.digest, "heldout")).sample(range(len(self.rows)), n)
            held = [self.rows[i] for i in sorted(picked)]
        self._held = held[:HELDOUT_SIZE]
        held_questions = {q for q, _ in self._held}
        # A training row is never a held-out question, whichever row the held-out copy came from.
        self._train = [i for i, (q, _) in enumerate(self.rows) if q not in held_questions]
        self._trainable = frozenset(self._train)
        if not self._train:
            raise DatasetError(f"dataset {self.path}: every row is in the held-out split; nothing to train on")
        self._foreign: set[str] = set()
        self._foreign_lock = threading.Lock()
        log.info("dataset %s: %d training rows, %d held out, hash %s..., verifier %s", self.path,
                 len(self._train), len(self._held), self.digest[:12], verifier)

    @classmethod
    def from_settings(cls, settings, *, seed: int, peer: str) -> TextData:
        return cls(settings.data_path, question=settings.data_question, answer=settings.data_answer,
                   verifier=settings.data_verifier, tolerance=settings.data_tolerance, seed=seed,
                   tasks_per_round=settings.tasks_per_round, peer=peer, eval_size=settings.eval_size)

    def row_task(self, index: int) -> Task:
        q, a = self.rows[index]
        return Task(task_id=f"{self.digest[:12]}:{index}", dataset=self.name, question=q, answer=a,
                    recipe={"data": self.digest, "index": index})

    def round_tasks(self, round: int) -> list[Task]:
        rng = random.Random(stable_seed(self.seed, round, self.peer))
        k = self.tasks_per_round
        picks = rng.sample(self._train, k) if k <= len(self._train) else rng.choices(self._train, k=k)
        return [self.row_task(i) for i in picks]

    def messages(self, task: Task) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task.question}]

    @cached_property
    def _heldout(self) -> list[Task]:
        return [Task(task_id=f"eval:{i}", dataset=self.name, question=q, answer=a) for i, (q, a) in enumerate(self._held)]

    def eval_tasks(self) -> list[Task]:
        return self._heldout[: self.eval_size]

    # ---- rewards -------------------------------------------------------------------------------------
    def answer_score(self, task: Task, completion: str) -> float:
        """The verifier's score of the completion's last <answer> against the task's (own) answer."""
        answer = extract_answer(completion)
        return 0.0 if answer is None else self.verify(answer, task.answer)

    def stage_rewards(self) -> dict[int, RewardFn]:
        """The reward function of each stage, for ReasoningGymRewards(stage_fns=...)."""
        return {0: self.answer_score}

    # ---- re-deriving swarm tasks ---------------------------------------------------------------------
    def source_row(self, task: Task) -> Task | None:
        """This peer's own row that `task.recipe` names, or None when the recipe is malformed, of another
        dataset (named in the log once), out of range or a held-out row."""
        try:
            recipe = V.mapping(task.recipe, "recipe")
            digest = V.field(recipe, "data", V.hex_bytes, 32).hex()
            index = V.field(recipe, "index", V.integer, 0, len(self.rows))
        except V.Invalid:
            return None
        if digest != self.digest:
            self._refuse_foreign(digest)
            return None
        return self.row_task(index) if index in self._trainable else None

    def _refuse_foreign(self, digest: str) -> None:
        with self._foreign_lock:  # transports call rederive from their own threads
            if digest in self._foreign or len(self._foreign) >= MAX_FOREIGN_LOGGED:
                return
            self._foreign.add(digest)
        log.warning("refusing swarm groups of dataset %s... (this peer plays %s, %s...): a peer needs the same "
                    "file and column names to check their answers; they are dropped as bad_task (said once)",
                    digest[:12], self.path.name, self.digest[:12])

    def rederive(self, task: Task) -> Task | None:
        if task.stage != 0:
            return None
        own = self.source_row(task)
        if own is None or own.question != task.question or own.answer != task.answer:
            return None
        own.task_id, own.stage = task.task_id, task.stage
        return own

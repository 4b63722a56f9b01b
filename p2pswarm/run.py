"""A node's output directory: metrics.jsonl, events.jsonl, and atomic checkpoints.

    <run>/metrics.jsonl              one JSON object per round
    <run>/events.jsonl               node events
    <run>/checkpoints/round_000012/  model/ (save_pretrained), trainer.pt, state.json
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from p2pswarm.components import Trainer

_PREFIX = "round_"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep the half-written copy
        raise


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.events_path = self.path / "events.jsonl"
        self.checkpoints = self.path / "checkpoints"

    # ---- metrics ------------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _metrics_text(self) -> str:
        return self.metrics_path.read_text() if self.metrics_path.exists() else ""

    @staticmethod
    def _parse(text: str) -> list[dict[str, Any]]:
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
        return rows

    def read_metrics(self) -> list[dict[str, Any]]:
        return self._parse(self._metrics_text())

    def repair_events(self) -> bool:
        """Cut a last line a kill left unfinished from events.jsonl (the next event would be glued to it and
        lost to every reader); whether there was one. For the node that writes this folder, at its start."""
        try:
            with open(self.events_path, "rb+") as f:
                data = f.read()
                if not data or data.endswith(b"\n"):
                    return False
                f.truncate(data.rfind(b"\n") + 1)
                return True
        except FileNotFoundError:
            return False

    def truncate_metrics(self, last_round: int) -> int:
        """Drop rows of rounds after `last_round` (a resumed node replays them) and any line a kill cut
        short; returns the number of rows dropped."""
        text = self._metrics_text()
        rows = self._parse(text)
        keep = [r for r in rows if r.get("round", -1) <= last_round]
        if len(keep) != len(rows) or (text and not text.endswith("\n")):
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
        return len(rows) - len(keep)

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoint_rounds(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        out = []
        for p in self.checkpoints.iterdir():
            if p.name.startswith(_PREFIX) and (p / "state.json").exists():
                try:
                    out.append(int(p.name[len(_PREFIX) :]))
                except ValueError:
                    pass
        return sorted(out)

    def checkpoint_path(self, round: int) -> Path:
        return self.checkpoints / f"{_PREFIX}{round:06d}"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        rounds = self.checkpoint_rounds()
        return (rounds[-1], self.checkpoint_path(rounds[-1])) if rounds else None

    def _sweep(self) -> None:
        """Leftovers of a writer that died mid-save (a kill, a full disk): half-written `.tmp-*` folders go,
        and a `.old-*` one, a checkpoint moved aside for its replacement that never came, is put back."""
        for p in self.checkpoints.glob(".old-*"):
            final = self.checkpoints / p.name[len(".old-"):].rsplit("-", 1)[0]
            if final.name.startswith(_PREFIX) and not final.exists():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def save_checkpoint(self, round: int, trainer: Trainer, keep: int, extra: dict[str, Any] | None = None) -> Path:
        """Write into a temporary folder and rename it into place, so a kill never leaves half a checkpoint.
        A save that fails (a full disk) removes what it wrote and raises; the previous checkpoints stay."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._sweep()  # first: the space a dead writer's leftovers hold may be what this save needs
        final = self.checkpoint_path(round)
        tmp = self.checkpoints / f".tmp-{final.name}-{os.getpid()}"
        try:
            tmp.mkdir()
            trainer.save(tmp)
            atomic_write_text(tmp / "state.json", json.dumps({"round": round, "time": time.time(), **(extra or {})}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            old = self.checkpoints / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for r in self.checkpoint_rounds()[:-keep]:
            shutil.rmtree(self.checkpoint_path(r), ignore_errors=True)
        for leftover in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return final

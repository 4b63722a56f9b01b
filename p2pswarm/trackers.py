"""Experiment trackers: TensorBoard and Weights & Biases, fed the very rows the node writes to metrics.jsonl.

A tracker is a listener of the node's event bus, like the JSONL event log and the Hub pusher: the game emits
each round's metrics row with ROUND_FINISHED (the same dict it appends to metrics.jsonl), and a tracker logs
its numeric fields at step = round, so the three views never disagree. Nested counters (`comm`) become
`comm/<name>`; strings (peer, node) and the wall-clock `time` are left out (both tools stamp wall time
themselves); a missing figure (None: no swarm groups this round) is left out rather than drawn as 0.

    tensorboard_dir=runs/tb       ->  runs/tb/<node name>/events.out.tfevents.*   (tensorboard --logdir runs/tb)
    wandb_project=p2pswarm        ->  <node output>/wandb/offline-run-*/           (wandb sync <that folder>)

Both packages are optional extras; asking for a tracker without its package is a UserError naming the pip
command, at start, rather than a run that silently logs nothing. A tracker that fails mid-run (disk full,
W&B service gone) is one warning line and is dropped: training goes on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from p2pswarm import events as ev
from p2pswarm.errors import UserError
from p2pswarm.events import Event, EventBus
from p2pswarm.run import RunDir
from p2pswarm.settings import Settings

log = logging.getLogger(__name__)

_NOT_SCALARS = frozenset({"round", "time"})  # the step, and wall time (both tools record it)


class TrackerError(UserError):
    """A tracker was asked for but cannot run (its package is missing)."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, nested dicts flattened to `outer/inner`; booleans as 0/1."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _NOT_SCALARS:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (bool, int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """Logs each round's metrics row (ROUND_FINISHED) and closes when the node stops (NODE_STOPPED).
    Subclasses open their writer on NODE_STARTED (they learn the first round there: a resumed node
    replays the rounds after its checkpoint) and implement _open, _log and _close."""

    kind = "tracker"

    def __init__(self) -> None:
        self._open_ = False
        self._failed = False

    def __call__(self, event: Event) -> None:
        if self._failed:
            return
        try:
            if event.kind == ev.NODE_STARTED and not self._open_:
                self._open(int(event.data.get("first_round", 0)))
                self._open_ = True
            elif event.kind == ev.ROUND_FINISHED and self._open_:
                self._log(int(event.data["round"]), scalars(event.data))
            elif event.kind == ev.NODE_STOPPED and self._open_:
                self._open_ = False
                self._close()
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            self._failed = True
            log.warning("%s logging stopped: %s: %s", self.kind, type(e).__name__, e)

    def _open(self, first_round: int) -> None:
        raise NotImplementedError

    def _log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in `folder` (one folder per node, so TensorBoard shows the nodes of a swarm side by side)."""

    kind = "TensorBoard"

    def __init__(self, folder: Path):
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            raise TrackerError("tensorboard_dir is set but the tensorboard package is missing: "
                               "pip install 'p2pswarm[tensorboard]'") from None
        self._writer_cls, self.folder, self._writer = SummaryWriter, Path(folder), None

    def _open(self, first_round: int) -> None:
        # purge_step: a resumed node replays the rounds after its checkpoint; their old points are dropped.
        self._writer = self._writer_cls(log_dir=str(self.folder), purge_step=first_round or None)
        log.info("TensorBoard: logging to %s", self.folder)

    def _log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # one flush a round, so `tensorboard --logdir` is live

    def _close(self) -> None:
        self._writer.close()


class WandbTracker(Tracker):
    """One W&B run per node start, named after the node, with the settings as its config."""

    kind = "W&B"

    def __init__(self, settings: Settings, folder: Path, name: str):
        super().__init__()
        try:
            import wandb
        except ImportError:
            raise TrackerError("wandb_project is set but the wandb package is missing: "
                               "pip install 'p2pswarm[wandb]'") from None
        self._wandb, self.folder, self.name, self._run = wandb, Path(folder), name, None
        self.project, self.mode = settings.wandb_project, settings.wandb_mode
        self.config = settings.model_dump(mode="json", exclude={"hub_token"})

    def _open(self, first_round: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._run = self._wandb.init(
            project=self.project, name=self.name, dir=str(self.folder), mode=self.mode, config=self.config,
            reinit="create_new",  # several agents of one process are several runs
            # console="off": the TUI owns the terminal, and W&B would otherwise wrap stdout and stderr
            settings=self._wandb.Settings(console="off", silent=True),
        )
        where = getattr(self._run, "dir", None) or self.folder
        log.info("W&B (%s): run %s logging to %s", self.mode, self.name, where)

    def _log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def _close(self) -> None:
        self._run.finish()


def attach_trackers(settings: Settings, run: RunDir, events: EventBus, name: str) -> list[Tracker]:
    """Subscribe the trackers the settings ask for to a node's events; none by default."""
    trackers: list[Tracker] = []
    if settings.tensorboard_dir is not None:
        trackers.append(TensorBoardTracker(settings.tensorboard_dir / name))
    if settings.wandb_project and settings.wandb_mode != "disabled":
        trackers.append(WandbTracker(settings, run.path, name))
    for t in trackers:
        events.subscribe(t)
    return trackers

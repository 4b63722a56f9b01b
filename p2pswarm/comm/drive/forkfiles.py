"""The rl-swarm Google-Drive fork's monitoring files: what its readers expect, written beside our own, and
read back (validated) by `p2pswarm status` / `report` / get_experiment_*. The one place for their shapes.

The fork's writers (rgym_exp/src/gdrive_logger.py, manager.py, gdrive_coordinator.py, utils/progress_tracker.py)
and its readers (rgym_exp/utils/experiment_manager.py: get_experiment_status, get_experiment_metrics with
aggregate_by_round; cumulative_reward_monitor.py; progress_tracker.get_experiment_progress) use:

    logs/<node>/metrics.jsonl             rows {timestamp, round, stage, node_id, experiment, ...}, several kinds
                                          a round: a reward summary (my_reward, ...; written twice a round by its
                                          Drive-mode manager), a cumulative row (is_cumulative_metric), one
                                          per stage (is_stage_detail), adaptive I/J rows (adaptive_*)
    logs/<node>/cumulative_metrics.jsonl  {timestamp, round, peer_id, cumulative_reward, average_reward_per_round}
    logs/<node>/training_events.jsonl     {timestamp, event_type, node_id, experiment, data}
    rewards/round_R/stage_S/<node>.json   {round, stage, reward, peer_id, submitted_at}: its coordinator counts
                                          these as the round's submissions
    winners/round_R/<node>.json           {round, winners, peer_id, submitted_at}: written, read by nothing
    progress_<node>.json                  JSON lines {timestamp, elapsed_seconds, event, node_id, ...}
    peers/<node>.json                     {peer_id, registered_at, node_role}: unsigned, written once
    checkpoints/round_R/<node>.pt         a torch pickle

The fork's node id is its file stem everywhere (its `peer_id` is the node name). What a p2pswarm node writes
for those readers (FORK_LOG_FILES, the reward submission, the progress file) is derived on the mirror's
thread from the run folder's metrics.jsonl and events.jsonl: the run folder stays the source of truth and
these files are rewritten whole, atomically, only under this node's own names.

Our `my_reward` is the node's reward_local_mean (the mean reward of its own completions in the round); the
fork's is the round's sum over its completions, so the two scales differ by the completions per round.
"""

from __future__ import annotations

import json
import time
from typing import Any

from p2pswarm import validate as V
from p2pswarm.comm.drive.fork import parse_fork_submission
from p2pswarm.comm.drive.store import parse_json, round_of

METRICS = "metrics.jsonl"
CUMULATIVE = "cumulative_metrics.jsonl"
TRAINING_EVENTS = "training_events.jsonl"
REWARD = "reward_local_mean"  # what our rows call the fork's my_reward
MAX_ROW_BYTES = 64 << 10  # one line of a log; the fork's are ~500 bytes, ours ~3 KB
MAX_LOG_BYTES = 256 << 20  # a whole log file
MAX_REWARD = 1e12

# ---- row kinds (a column of get_experiment_metrics) -----------------------------------------------------------
ROUND = "round"  # ours: one row per round (with the fork's summary fields added in the shared copy)
SUMMARY = "reward"  # the fork's round summary: my_reward, mean_reward, my_rank...
CUMULATIVE_ROW = "cumulative"
STAGE = "stage"
ADAPTIVE = "adaptive"
OTHER = "other"

# Fields whose type we know: a row holding one of them out of range is dropped (and counted).
_INT_FIELDS = ("stage", "total_agents", "my_rank", "num_samples", "adaptive_I", "adaptive_J")
_REAL_FIELDS = ("my_reward", "mean_reward", "std_reward", "min_reward", "max_reward", "median_reward", "percentile",
                "cumulative_reward", "average_reward_per_round", "stage_reward", "avg_reward_per_sample",
                "adaptive_J_continuous", "adaptive_baseline", "adaptive_round_reward", REWARD)
_FLAG_FIELDS = ("is_cumulative_metric", "is_stage_detail")


def row_kind(row: dict) -> str:
    if REWARD in row or "peer" in row:  # the fork's rows name the node `peer_id`, never `peer`
        return ROUND
    if row.get("is_cumulative_metric") is True:
        return CUMULATIVE_ROW
    if row.get("is_stage_detail") is True:
        return STAGE
    if any(k.startswith("adaptive_") for k in row):
        return ADAPTIVE
    return SUMMARY if "my_reward" in row else OTHER


def clean_row(obj: Any, now: float | None = None) -> dict | None:
    """A metrics row, ours or the fork's, if every field we know is in range (round an int in [0, 2**31),
    stage and counts ints, rewards finite, timestamp / time plausible wall-clock seconds, node_id a name,
    flags bools), else None. Other fields are kept as they are. Never raises."""
    try:
        V.mapping(obj, "row")
        V.field(obj, "round", V.integer, 0)
        for k in _INT_FIELDS:
            V.field(obj, k, V.integer, 0, default=None)
        for k in _REAL_FIELDS:
            if obj.get(k) is not None:  # ours writes null for a mean of nothing
                V.real(obj[k], k, -MAX_REWARD, MAX_REWARD)
        for k in ("timestamp", "time"):
            V.field(obj, k, V.timestamp, now, default=None)
        V.field(obj, "node_id", V.name, default=None)
        for k in _FLAG_FIELDS:
            V.field(obj, k, V.flag, default=None)
    except Exception:  # noqa: BLE001 - anyone who can write to the folder wrote this
        return None
    return obj


def _loads(line: str) -> Any:
    """A JSON value, or None. NaN is allowed here (a diverged loss is logged as NaN): clean_row refuses it in
    every field it knows, and elsewhere it is just a NaN in a DataFrame."""
    try:
        return V.json_value(line, nan=True)
    except Exception:  # noqa: BLE001 - Invalid, UnicodeDecodeError
        return None


def parse_rows(data: bytes | str | None, now: float | None = None) -> tuple[list[dict], int]:
    """The valid JSON-object rows of a JSONL file and the number of lines dropped (not JSON, NaN or Infinity,
    too long or nested, a field out of range). An empty last line (a file ending in a newline) is no row."""
    if not data:
        return [], 0
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        row = clean_row(_loads(line), now) if len(line) <= MAX_ROW_BYTES else None
        if row is None:
            bad += 1
        else:
            rows.append(row)
    return rows, bad


# ---- peers/<node>.json: parsed in fork.py (parse_fork_peer), the one place for the fork's registrations -------


# ---- progress_<node>.json, cumulative_metrics.jsonl, rewards/ --------------------------------------------------
def progress_path(store, node: str) -> str:
    return store.path(f"progress_{node}.json")


def last_progress(store, node: str, now: float | None = None) -> dict | None:
    """The last valid line of progress_<node>.json: {event, timestamp, round (or None)}, or None."""
    data = store.read(progress_path(store, node), MAX_LOG_BYTES)
    if not data:
        return None
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        obj = parse_json(line) if len(line) <= MAX_ROW_BYTES else None
        try:
            return {"event": V.field(obj, "event", V.name), "timestamp": V.field(obj, "timestamp", V.timestamp, now),
                    "round": V.field(obj, "round", V.integer, 0, default=None)}
        except Exception:  # noqa: BLE001 - a cut or forged line: look at the one before
            continue
    return None


def last_cumulative(store, node: str, now: float | None = None) -> float | None:
    """The node's cumulative reward: the last valid row of logs/<node>/cumulative_metrics.jsonl, or None."""
    rows, _ = parse_rows(store.read(store.path("logs", node, CUMULATIVE), MAX_LOG_BYTES), now)
    for row in reversed(rows):
        v = row.get("cumulative_reward")
        if v is not None:
            return float(v)
    return None


def reward_path(store, round: int, stage: int, node: str) -> str:
    return store.path("rewards", f"round_{round}", f"stage_{stage}", f"{node}.json")


def submitted_at(store, round: int, node: str, now: float | None = None) -> float | None:
    """When the node submitted its reward for `round` (stage 0, where the fork submits), or None."""
    try:
        return parse_fork_submission(node, round, store.read_json(reward_path(store, round, 0, node)), now)
    except Exception:  # noqa: BLE001 - absent, or not a valid submission
        return None


def fork_checkpoints(store) -> dict[str, list[int]]:
    """The fork's checkpoints/round_R/<node>.pt, as node -> rounds (sorted)."""
    out: dict[str, list[int]] = {}
    folder = store.path("checkpoints")
    for sub in store.subfolders(folder):
        r = round_of(sub)
        if r is None:
            continue
        for fname, size, _ in store.listing(f"{folder}/{sub}"):
            if fname.endswith(".pt") and size > 0:
                out.setdefault(fname[: -len(".pt")], []).append(r)
    return {n: sorted(rs) for n, rs in out.items()}



# ---- writing: our run folder's logs in the fork's shapes -------------------------------------------------------
def own_rows(data: bytes | None) -> list[dict]:
    """The JSON-object lines of one of this node's own run-folder logs (a line a kill cut short is skipped)."""
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            row = V.json_value(line, nan=True)
        except Exception:  # noqa: BLE001 - a line a kill cut short
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _reward(row: dict) -> float | None:
    v = row.get(REWARD)
    return float(v) if type(v) in (int, float) else None


def for_fork(rows: list[dict], node: str, experiment: str) -> tuple[list[dict], list[dict]]:
    """Our metrics rows with the fork's fields added (never replacing one of ours), and the matching
    cumulative_metrics.jsonl rows. One row a round: it carries the fields of the fork's summary and cumulative
    rows, so that its aggregate_by_round keeps it (node_id, round) and sums my_reward to the round's reward.
    A round written twice (a resumed node replays rounds after its checkpoint) counts once, its last value."""
    by_round: dict[int, float] = {}
    metrics, cumulative = [], []
    for row in rows:
        r = row.get("round")
        if type(r) is not int or r < 0:
            continue
        reward = _reward(row)
        if reward is not None:
            by_round[r] = reward
        else:
            by_round.pop(r, None)
        total = sum(by_round.values())
        t = row.get("time") if type(row.get("time")) in (int, float) else None
        fork = {"timestamp": t, "stage": 0, "node_id": node, "experiment": experiment, "my_reward": reward,
                "cumulative_reward": total, "average_reward_per_round": total / (r + 1)}
        metrics.append({**row, **{k: v for k, v in fork.items() if k not in row}})
        cumulative.append({"timestamp": t, "round": r, "peer_id": node, "cumulative_reward": total,
                           "average_reward_per_round": total / (r + 1)})
    return metrics, cumulative


_PROGRESS_EVENTS = {"node_started": "training_started", "round_finished": "round_complete",
                    "node_stopped": "training_complete", "error": "error"}


def events_for_fork(events: list[dict], node: str, experiment: str) -> tuple[list[dict], list[dict]]:
    """Our events.jsonl rows as the fork's training_events.jsonl rows and progress_<node>.json lines."""
    training, progress = [], []
    start, rounds = None, 0
    for e in events:
        kind, t = e.get("kind"), e.get("time")
        if not isinstance(kind, str) or type(t) not in (int, float):
            continue
        data = {k: v for k, v in e.items() if k not in ("time", "kind")}
        training.append({"timestamp": t, "event_type": kind, "node_id": node, "experiment": experiment, "data": data})
        if kind not in _PROGRESS_EVENTS:
            continue
        if kind == "node_started" or start is None:
            start = t
        line = {"timestamp": t, "elapsed_seconds": t - start, "event": _PROGRESS_EVENTS[kind], "node_id": node}
        if kind == "node_started":
            line["experiment"] = experiment
        elif kind == "round_finished" and type(e.get("round")) is int:
            rounds += 1
            line.update(round=e["round"], stage=0)
            if type(e.get(REWARD)) in (int, float):
                line["reward"] = round(e[REWARD], 4)
        elif kind == "node_stopped":
            line.update(total_rounds=rounds, total_elapsed_seconds=t - start)
        elif kind == "error":
            line.update(error_type="error", error_message=str(e.get("message", ""))[:500])
        progress.append(line)
    return training, progress


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def reward_submission(round: int, reward: float, node: str, at: float | None = None) -> bytes:
    return json.dumps({"round": round, "stage": 0, "reward": reward, "peer_id": node,
                       "submitted_at": time.time() if at is None else at}, indent=2).encode()

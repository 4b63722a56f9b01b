"""Looking at an experiment: its round clock, its peers and their rewards (`p2pswarm status`, `p2pswarm
report`), and the functions users of the rl-swarm Drive fork know:

    from p2pswarm import get_experiment_status, get_experiment_metrics
    status = get_experiment_status("/content/drive/MyDrive/rl-swarm", "my_swarm")
    print(status["current_round"], status["num_active_peers"])
    df = get_experiment_metrics("/content/drive/MyDrive/rl-swarm", "my_swarm")   # one row per node per round
    df.groupby("round")["my_reward"].mean().plot()

The shared folder is read through fsspec (a path or any fsspec URL). Nothing here imports pandas or
matplotlib until a function that needs it is called.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pswarm import validate as V
from p2pswarm.comm.drive import forkfiles
from p2pswarm.comm.drive.fork import FORK_PEER_TIMEOUT, looks_like_fork_peer, parse_fork_peer
from p2pswarm.comm.drive.records import parse_registration
from p2pswarm.comm.drive.store import FolderStore
from p2pswarm.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

REWARD = "reward_local_mean"  # the reward of a node's own rollouts: how well its policy does
RECENT = 10  # rounds in the "recent reward" mean
MAX_METRICS_BYTES = 256 << 20  # a node's metrics.jsonl in the shared folder (~3 KB a round)


class ExperimentNotFound(UserError, FileNotFoundError):
    """No such experiment (or no such folder); the message names the experiments that do exist."""

    def __init__(self, where: str, name: str, available: list[str], *, folder_missing: bool = False):
        self.available = available
        if folder_missing:
            super().__init__(f"{where} does not exist (or is not mounted)")
        else:
            listed = ", ".join(available) if available else "none"
            super().__init__(f"no experiment {name!r} in {where} (experiments there: {listed})")


def list_experiments(root: str) -> list[str]:
    """Names of the experiments in a shared folder (the folders under <root>/experiments)."""
    store = FolderStore(str(root), "_")
    return sorted(n for n in store.subfolders(f"{store.root}/experiments") if not n.startswith("."))


def _open(root: str, name: str) -> FolderStore:
    store = FolderStore(str(root), name)
    try:
        found, root_found = store.fs.isdir(store.base), store.fs.isdir(store.root)
    except OSError:
        found = root_found = False
    if not root_found:
        raise ExperimentNotFound(str(root), name, [], folder_missing=True)
    if not found:
        raise ExperimentNotFound(str(root), name, list_experiments(root))
    return store


def _rows(data: bytes | str | None) -> list[dict]:
    """A node's metrics rows, ours deduplicated by round, the fork's all kept (forkfiles.py)."""
    return _keep(forkfiles.parse_rows(data)[0])


def _keep(rows: list[dict]) -> list[dict]:
    """Ours: one row per round, the last one written (a resumed node replays the rounds after its checkpoint).
    The fork's: every row (it writes several kinds a round), in the order written."""
    ours = {r["round"]: r for r in rows if forkfiles.row_kind(r) == forkfiles.ROUND}
    theirs = [r for r in rows if forkfiles.row_kind(r) != forkfiles.ROUND]
    return sorted([ours[k] for k in ours] + theirs, key=lambda r: r["round"])


def _per_round(rows: list[dict]) -> list[tuple[int, float | None]]:
    """(round, the node's reward that round) for every round it logged: ours reward_local_mean, the fork's
    the my_reward of its last summary row of the round."""
    out: dict[int, float | None] = {}
    for r in rows:
        kind = forkfiles.row_kind(r)
        if kind == forkfiles.ROUND:
            out[r["round"]] = _finite(r.get(REWARD))
        elif kind == forkfiles.SUMMARY:
            out[r["round"]] = _finite(r.get("my_reward"))
        else:
            out.setdefault(r["round"], None)
    return sorted(out.items())


def _finite(x: Any) -> float | None:
    return _opt(V.real, x, -1e12, 1e12)


def _opt(check, v: Any, *args: Any) -> Any:
    """`check(v)` (a validate.py checker), or None when v does not pass: these files are anyone's to write."""
    try:
        return check(v, "field", *args)
    except V.Invalid:
        return None


def _node_metrics(store: FolderStore) -> tuple[dict[str, list[dict]], int]:
    """logs/<node>/metrics.jsonl of every node (see _keep), and the number of rows dropped as invalid."""
    out, bad = {}, 0
    logs = store.path("logs")
    for node in store.subfolders(logs):
        if node.startswith("."):
            continue
        rows, dropped = forkfiles.parse_rows(store.read(f"{logs}/{node}/metrics.jsonl", MAX_METRICS_BYTES))
        bad += dropped
        if rows:
            out[node] = _keep(rows)
    return out, bad


def _summary(rows: list[dict]) -> dict[str, Any]:
    played = _per_round(rows)
    rewards = [v for _, v in played if v is not None]
    recent = rewards[-RECENT:]
    last = next((r for r in reversed(rows) if forkfiles.row_kind(r) == forkfiles.ROUND), None)
    return {
        "rounds_done": len(played),
        "last_round": played[-1][0] if played else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_recent": sum(recent) / len(recent) if recent else None,
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "reward_total": sum(rewards) if rewards else None,
        "swarm_peers_last": _opt(V.integer, last.get("swarm_peers"), 0) if last else None,
    }


def _last_time(rows: list[dict]) -> float | None:
    times = [t for r in rows for t in (r.get("timestamp"), r.get("time")) if type(t) in (int, float)]
    return max(times) if times else None


def _fork_state(entry: dict, store: FolderStore, rows: list[dict], clock_round: int | None, now: float,
                peer_timeout: float) -> None:
    """A fork node has no heartbeat: it is live while its newest sign of life (registration, metrics row,
    progress line, reward submission for the clock's round or the one before) is younger than peer_timeout
    or FORK_PEER_TIMEOUT, whichever is longer, until its progress file says it completed."""
    node = entry["node"]
    signs = [entry["registered_at"], _last_time(rows)]
    progress = forkfiles.last_progress(store, node, now)
    if progress:
        signs.append(progress["timestamp"])
    if clock_round is not None:
        signs += [forkfiles.submitted_at(store, r, node, now) for r in (clock_round, clock_round - 1) if r >= 0]
    seen = max(t for t in signs if t is not None)
    age = max(0.0, now - seen)
    done = progress is not None and progress["event"] == "training_complete"
    entry.update(last_heartbeat=seen, heartbeat_age_s=round(age, 1),
                 state="left" if done else ("live" if age <= max(peer_timeout, FORK_PEER_TIMEOUT) else "stale"))
    played = [r["round"] for r in rows]
    entry["round"] = max(played) if played else (progress or {}).get("round")


def get_experiment_status(root: str, name: str, *, peer_timeout: float = 60.0) -> dict[str, Any]:
    """The experiment's state: its round clock, every node that registered or logged (live, left or stale by
    heartbeat age), and each node's rewards from logs/<node>/metrics.jsonl. Reads the rl-swarm Drive fork's
    files too: its unsigned peers/*.json (shown as fork peers, kind "fork"), its state file's updated_at, its
    checkpoints/round_R/<node>.pt, logs/<node>/cumulative_metrics.jsonl and progress_<node>.json.

    Keys (the fork's, plus more): experiment_name, path, checked_at, current_round, current_stage,
    last_updated, coordinator, active_peers and num_active_peers (live nodes), peer_ids (their names),
    peers (one dict per node: node, name, kind (p2pswarm|fork), peer_id, role, state, round, stage,
    last_heartbeat, heartbeat_age_s, rounds_done, last_round, reward_last, reward_recent (mean of the last 10
    rounds), reward_mean, reward_total, cumulative_reward, latest_checkpoint), latest_checkpoint,
    cumulative_rewards (node -> its last cumulative reward) and total_cumulative_reward (when any node has
    one), total_metric_entries, invalid_peer_files, invalid_metric_rows.
    Raises ExperimentNotFound when the experiment is not there."""
    from p2pswarm.comm.drive.mirror import shared_checkpoints

    store = _open(root, name)
    now = time.time()
    clock = store.read_clock()
    updated = clock.get("updated") if clock else None
    if clock and updated is None:  # the fork's coordinator writes updated_at
        updated = _opt(V.timestamp, (store.read_json(store.state_path()) or {}).get("updated_at"), now)
    status: dict[str, Any] = {
        "experiment_name": name,
        "path": store.base,
        "checked_at": now,
        "current_round": clock["round"] if clock else None,
        "current_stage": clock.get("stage", 0) if clock else None,
        "last_updated": updated,
        "coordinator": clock.get("coordinator_name") if clock else None,
    }
    peers: dict[str, dict[str, Any]] = {}
    invalid = 0
    folder = store.path("peers")
    for fname, _, _ in store.listing(folder):
        if not fname.endswith(".json"):
            continue
        node = fname[: -len(".json")]
        obj = store.read_json(f"{folder}/{fname}")
        reg = parse_registration(node, obj, now)
        if reg is None:
            try:
                theirs = parse_fork_peer(node, obj, now) if looks_like_fork_peer(obj) else None
            except Exception:  # noqa: BLE001 - a fork registration with a field out of range
                theirs = None
            if theirs is None:  # a forged or broken signed record, a field out of range (a heartbeat from the future, NaN...)
                invalid += 1
            else:
                peers[node] = {"node": node, "name": theirs.node, "kind": "fork", "peer_id": None,
                               "role": theirs.role, "registered_at": theirs.registered_at, "stage": None,
                               "ignoring": []}
            continue
        age = max(0.0, now - reg.time)
        state = "left" if reg.left else ("live" if age <= peer_timeout else "stale")
        peers[node] = {"node": node, "name": reg.name, "kind": "p2pswarm", "peer_id": reg.peer_id, "role": reg.role,
                       "state": state, "round": reg.round, "stage": reg.stage, "last_heartbeat": reg.time,
                       "heartbeat_age_s": round(age, 1), "ignoring": list(reg.ignoring) if state == "live" else []}
    metrics, bad_rows = _node_metrics(store)
    for node, entry in peers.items():
        if entry["kind"] == "fork":
            _fork_state(entry, store, metrics.get(node, []), status["current_round"], now, peer_timeout)
    for node, rows in metrics.items():
        last = rows[-1]
        entry = peers.setdefault(node, {"node": node, "name": _opt(V.name, last.get("node")) or node,
                                        "kind": "p2pswarm" if forkfiles.row_kind(last) == forkfiles.ROUND else "fork",
                                        "peer_id": _opt(V.peer_id, last.get("peer")),
                                        "role": "", "state": "unregistered", "round": None, "stage": None,
                                        "last_heartbeat": None, "heartbeat_age_s": None, "ignoring": []})
        entry.update(_summary(rows))
    theirs_ckpt = forkfiles.fork_checkpoints(store)
    cumulative = {}
    for node, entry in peers.items():
        entry.pop("registered_at", None)
        if "rounds_done" not in entry:
            entry.update(_summary([]))
        ckpts = shared_checkpoints(store, node) + theirs_ckpt.get(node, [])
        entry["latest_checkpoint"] = max(ckpts) if ckpts else None
        entry["cumulative_reward"] = forkfiles.last_cumulative(store, node, now)
        if entry["cumulative_reward"] is not None:
            cumulative[node] = entry["cumulative_reward"]
    by_id = {p["peer_id"]: p for p in peers.values() if p["peer_id"]}
    for p in peers.values():
        p["ignored_by"] = sorted(q["node"] for q in peers.values() if p["peer_id"] in q["ignoring"])
    ignored_unknown = {i for p in peers.values() for i in p["ignoring"]} - set(by_id)
    live = [n for n, p in sorted(peers.items()) if p["state"] == "live"]
    checkpoints = [p["latest_checkpoint"] for p in peers.values() if p["latest_checkpoint"] is not None]
    checkpoints += [r for rs in theirs_ckpt.values() for r in rs]  # the fork's nodes that never registered too
    status.update({
        "active_peers": len(live),
        "num_active_peers": len(live),
        "peer_ids": live,
        "peers": [peers[n] for n in sorted(peers)],
        "latest_checkpoint": max(checkpoints) if checkpoints else None,
        "total_metric_entries": sum(len(r) for r in metrics.values()),
        "invalid_peer_files": invalid,
        "invalid_metric_rows": bad_rows,
        "ignored_unregistered": sorted(ignored_unknown),  # banned senders with no registration (DHT side, relayed)
    })
    if cumulative:  # as the fork: only when some node logged one
        status["cumulative_rewards"] = dict(sorted(cumulative.items()))
        status["total_cumulative_reward"] = sum(cumulative.values())
    return status


# ---- metrics as a DataFrame ---------------------------------------------------------------------------------
def _frame(by_node: dict[str, list[dict]]) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for folder, node_rows in by_node.items():
        for r in node_rows:
            kind = forkfiles.row_kind(r)
            node = _opt(V.name, r.get("node")) or _opt(V.name, r.get("node_id")) or folder
            reward = r.get("my_reward") if "my_reward" in r else (r.get(REWARD) if kind == forkfiles.ROUND else None)
            stamp = r.get("timestamp") if r.get("timestamp") is not None else r.get("time")
            # the fork's names, taken from the row when it has them (its own rows, our shared copies)
            rows.append({**r, "node": node, "node_id": r.get("node_id") or node, "my_reward": reward,
                         "timestamp": stamp, "stage": r.get("stage", 0), "row_kind": kind})
    if not rows:
        return pd.DataFrame(columns=["node", "round", "peer", REWARD, "reward_mean", "node_id", "my_reward", "timestamp",
                                     "stage", "row_kind"])
    df = pd.json_normalize(rows, sep=".")  # comm{...} becomes comm.batches_sent, ...
    for col in ("my_reward", "timestamp"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    first = ["node", "round", "peer", REWARD, "reward_mean"]
    df = df[[c for c in first if c in df] + [c for c in df.columns if c not in first]]
    return df.sort_values(["node", "round"], kind="stable").reset_index(drop=True)


def _by_round(df: pd.DataFrame) -> pd.DataFrame:
    """The fork's aggregate_by_round: one row per node_id and round, my_reward summed over the round's rows,
    the first timestamp, the last value of each adaptive_* column."""
    if df.empty:
        return df
    agg = {"my_reward": "sum", "timestamp": "first", **{c: "last" for c in df.columns if c.startswith("adaptive_")}}
    return df.groupby(["node_id", "round"]).agg(agg).reset_index()


def get_experiment_metrics(root: str, name: str, aggregate_by_round: bool = False) -> pd.DataFrame:
    """Every node's metrics.jsonl from the shared folder's logs/: ours one row per node per round, the
    fork's every row it wrote (a summary with my_reward, a cumulative row, a row per stage... : `row_kind`
    says which). Columns: `node`, the fork's `node_id`, `my_reward` (ours: reward_local_mean), `timestamp`,
    `stage`, `row_kind`, and every metrics.jsonl column (nested counters flattened: `comm.batches_sent`).
    Rows with a field out of range are dropped (get_experiment_status counts them). `aggregate_by_round`:
    as the fork's, one row per node_id and round (my_reward summed, the first timestamp, adaptive_* last).
    Raises ExperimentNotFound when the experiment is not there."""
    df = _frame(_node_metrics(_open(root, name))[0])
    return _by_round(df) if aggregate_by_round else df


def get_run_metrics(runs_dir: str | Path, name: str) -> pd.DataFrame:
    """The same DataFrame from local run folders: <runs_dir>/<name>/<node>/metrics.jsonl."""
    base = Path(runs_dir) / name
    if not Path(runs_dir).is_dir():
        raise ExperimentNotFound(str(runs_dir), name, [], folder_missing=True)
    if not base.is_dir():
        available = sorted(p.name for p in Path(runs_dir).iterdir() if p.is_dir()) if Path(runs_dir).is_dir() else []
        raise ExperimentNotFound(str(runs_dir), name, available)
    by_node = {}
    for p in sorted(base.iterdir()):
        f = p / "metrics.jsonl"
        if f.is_file():
            rows = _rows(f.read_text(errors="replace"))
            if rows:
                by_node[p.name] = rows
    return _frame(by_node)


# ---- the PNG report -----------------------------------------------------------------------------------------
def plot_rewards(df: pd.DataFrame, out: str | Path, *, title: str = "", metric: str = REWARD, window: int = 5) -> Path:
    """Reward per round per node: faint points for each round, a line for the rolling mean. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if df.empty or metric not in df:
        raise ValueError(f"no {metric} values to plot")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    try:
        # the fork writes several rows a round: its last value of the metric stands for the round
        per_round = df.dropna(subset=[metric]).groupby(["node", "round"], sort=True)[metric].last().reset_index()
        for i, (node, g) in enumerate(per_round.groupby("node", sort=True)):
            color = f"C{i % 10}"
            ax.scatter(g["round"], g[metric], s=14, alpha=0.35, color=color, linewidths=0)
            ax.plot(g["round"], g[metric].rolling(window, min_periods=1).mean(), color=color, lw=1.8, label=str(node))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric}\n(points: each round; lines: rolling mean of {window})")
        ax.set_title(title or "reward per round")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small", ncols=max(1, df["node"].nunique() // 12 + 1))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


# ---- `p2pswarm status` as text ------------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _num(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_status(status: dict[str, Any]) -> str:
    """A few summary lines and an aligned table of the peers."""
    lines = [f"experiment {status['experiment_name']}  ({status['path']})"]
    if status["current_round"] is None:
        lines.append("round clock: not started (no coordinator has run yet)")
    else:
        updated = status["last_updated"]
        age = _age(status["checked_at"] - updated) + " ago" if updated is not None else "-"  # read_clock checked it
        lines.append(f"round {status['current_round']}, stage {status['current_stage']}  "
                     f"(clock kept by {status['coordinator'] or '?'}, advanced {age})")
    lines.append(f"{status['num_active_peers']} live peer(s) of {len(status['peers'])}"
                 + (f"; latest checkpoint: round {status['latest_checkpoint']}" if status["latest_checkpoint"] is not None else "")
                 + (f"; {status['invalid_peer_files']} invalid peer file(s) ignored" if status["invalid_peer_files"] else "")
                 + (f"; {status['invalid_metric_rows']} invalid metrics row(s) ignored" if status["invalid_metric_rows"] else ""))
    forks = sum(p["kind"] == "fork" for p in status["peers"])
    if forks:
        lines.append(f"{forks} rl-swarm fork node(s) (unsigned, no heartbeat: live while they write their files)")
    if "total_cumulative_reward" in status:
        lines.append(f"total cumulative reward {status['total_cumulative_reward']:.3f}")
    header = ("node", "role", "state", "heartbeat", "round", "stage", "rounds", f"reward(last {RECENT})", "reward(last)",
              "checkpoint", "ignored by")
    table = [header]
    for p in status["peers"]:
        role = (p["role"] or "-") + (" (fork)" if p["kind"] == "fork" else "")
        table.append((str(p["node"]), role, p["state"], _age(p["heartbeat_age_s"]),
                      "-" if p["round"] is None else str(p["round"]), "-" if p["stage"] is None else str(p["stage"]),
                      str(p["rounds_done"]), _num(p["reward_recent"]), _num(p["reward_last"]),
                      "-" if p["latest_checkpoint"] is None else str(p["latest_checkpoint"]),
                      str(len(p["ignored_by"])) if p["ignored_by"] else "-"))
    if len(table) > 1:
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines.append("")
        for row in table:
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    else:
        lines.append("no peers have registered yet")
    return "\n".join(lines)

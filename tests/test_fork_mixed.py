"""Mixed experiments: nodes of the rl-swarm Google-Drive fork (github Elrashid/rl-swarm) and ours in one shared
folder. The fork's side is played by a small writer here that writes and reads the fork's files as its code does
(rgym_exp/src/gdrive_coordinator.py, gdrive_rollout_sharing.py, manager.py, data.py: registration once,
a `.json` rollout file per round, a reward submission once it collected the round, following the state
file's round); its readers are re-implemented in a few lines, never imported. Real folders, and real node
processes for the end-to-end tests; every wait is bounded and every process started is killed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from helpers import HANG, PROCESS_TEST_TIMEOUT, by_name, drive_clock, drive_cmd, metrics, wait_until
from p2pswarm.comm.drive.coordinator import FolderCoordinator
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.identity import Identity
from p2pswarm.rewards import ReasoningGymRewards
from p2pswarm.types import Group

EXP = "fork-mixed"


# ---- the fork's side: its files, as its writers make them, and its rollout reader -------------------------------
def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # the fork's own atomic write: <file>.tmp, then os.replace
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def fork_register(exp: Path, node: str, role: str = "worker") -> None:
    write_json(exp / "peers" / f"{node}.json", {"peer_id": node, "registered_at": time.time(), "node_role": role})


def fork_payload(task, completions) -> dict:
    return {"world_state": {"environment_states": {"question": task.question, "answer": task.answer,
                                                   "metadata": task.metadata},
                            "opponent_states": None, "personal_states": None},
            "actions": completions, "metadata": None}


def md5_id(question: str) -> int:
    return int(hashlib.md5(question.encode()).hexdigest(), 16)


def fork_publish(exp: Path, node: str, round: int, tasks, stage: int = 0) -> None:
    """A fork rollout file: one payload per task, a right and a wrong answer, keyed by the question's md5."""
    rollouts = {str(md5_id(t.question)): [fork_payload(t, [f"<answer>{t.answer}</answer>", "<answer>no</answer>"])]
                for t in tasks}
    write_json(exp / "rollouts" / f"round_{round}" / f"stage_{stage}" / f"{node}.json",
               {"peer_id": node, "round": round, "stage": stage, "timestamp": time.time(), "rollouts": rollouts})


def fork_submit(exp: Path, node: str, round: int, reward: float = 0.5) -> None:
    write_json(exp / "rewards" / f"round_{round}" / "stage_0" / f"{node}.json",
               {"round": round, "stage": 0, "reward": reward, "peer_id": node, "submitted_at": time.time()})


def fork_fetch(exp: Path, round: int, me: str, stage: int = 0) -> dict[str, dict[int, list[dict]]]:
    """What the fork's worker takes from the folder (fetch_rollouts + transplant_trees' checks): every other
    `<peer>.json` of the stage folder with `rollouts`, batch ids that are ints, payloads with a non-empty list of
    string actions whose question hashes to the batch id."""
    out: dict[str, dict[int, list[dict]]] = {}
    folder = exp / "rollouts" / f"round_{round}" / f"stage_{stage}"
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        peer = f.name.replace(".json", "")
        if peer == me:
            continue
        data = json.loads(f.read_text())
        if "rollouts" not in data:
            continue
        for bid, payloads in data["rollouts"].items():
            for p in payloads:
                actions, env = p.get("actions"), p["world_state"]["environment_states"]
                if (isinstance(actions, list) and actions and all(isinstance(a, str) for a in actions)
                        and md5_id(env["question"]) == int(bid)):
                    out.setdefault(peer, {}).setdefault(int(bid), []).append(p)
    return out


def tasks(n: int = 2, start: int = 0):
    data = ReasoningGymData("easy", seed=7)
    out, i = [], start
    while len(out) < n:
        t = data.train_task(i)
        i += 1
        if t is not None:
            out.append(t)
    return out


# ---- in-process: FolderComm on a real folder ----------------------------------------------------------------
def comm(url, name, **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("poll", 0.02)
    kw.setdefault("peer_timeout", 5.0)
    return FolderComm(url, Identity.generate(), EXP, name=name, **kw)


def ours(task) -> Group:
    return Group(task, [f"<answer>{task.answer}</answer>", "<answer>?</answer>"], "p", [1.0, 0.0])


def test_with_trust_ours_take_the_forks_rollouts_rescored_and_the_fork_parses_ours(tmp_path):
    url = str(tmp_path / "drive")
    exp = tmp_path / "drive" / "experiments" / EXP
    a = comm(url, "ours", trust_folder=True, timeout=30.0)
    try:
        fork_register(exp, "node_1")
        forks = tasks(2)
        fork_publish(exp, "node_1", 0, forks)
        mine = tasks(3, start=100)
        a.publish(0, 0, [ours(t) for t in mine])

        got = a.collect(0, 0)  # returns as soon as the one live member, the fork node, delivered
        assert [g.peer for g in got] == ["fork:node_1"] * 2
        assert [(g.task.question, g.task.answer) for g in got] == [(t.question, t.answer) for t in forks]
        ReasoningGymRewards().score(got)  # the receiver's own scorer, on the answer the fork's file carries
        assert [g.rewards for g in got] == [[1.0, 0.0]] * 2
        row = by_name(a.counters()["per_peer"])["node_1"]
        assert (row["batches"], row["groups"]) == (1, 2)
        assert a.peers()[0].name == "node_1"

        parsed = fork_fetch(exp, 0, me="node_1")["ours"]  # the fork's worker reads our copy
        assert sorted(p["world_state"]["environment_states"]["question"] for ps in parsed.values() for p in ps) == \
            sorted(t.question for t in mine)
        assert all(p["actions"][0] == f"<answer>{p['world_state']['environment_states']['answer']}</answer>"
                   for ps in parsed.values() for p in ps)
        assert (exp / "rollouts" / "round_0" / "stage_0" / "ours.msgpack").is_file()  # our own format as before
    finally:
        a.close()


def test_two_of_ours_read_each_others_signed_batch_not_the_json_copy(tmp_path):
    url = str(tmp_path / "drive")
    a, b = comm(url, "a", trust_folder=True), comm(url, "b", trust_folder=True)
    try:
        b.publish(0, 0, [ours(t) for t in tasks(1)])
        assert len(a.collect(0, 0)) == 1
        row = by_name(a.counters()["per_peer"])["b"]
        assert row["batches"] == 1 and not any(k.startswith("dropped") for k in a.counters())
    finally:
        a.close()
        b.close()


def test_without_trust_fork_files_are_dropped_counted_and_logged_once(tmp_path, caplog):
    url = str(tmp_path / "drive")
    exp = tmp_path / "drive" / "experiments" / EXP
    fork_register(exp, "node_1")
    a = comm(url, "ours")
    try:
        with caplog.at_level(logging.INFO, logger="p2pswarm.comm.drive.manager"):
            for r in range(2):
                fork_publish(exp, "node_1", r, tasks(2))
                t0 = time.monotonic()
                assert a.collect(r, 0) == []  # the fork node is no member: nobody is waited for
                assert time.monotonic() - t0 < a.timeout
                a.publish(r, 0, [ours(t) for t in tasks(1)])
        c = a.counters()
        assert c["dropped_unsigned_fork"] == 3  # its registration and its two rollout files
        assert "dropped_bad_registration" not in c
        assert by_name(c["per_peer"])["node_1"]["dropped_unsigned_fork"] == 3
        assert not list(exp.glob("rollouts/*/stage_0/ours.json"))  # no copy for the fork without the setting
        shown = {p.name: p for p in a.peers()}  # the UI's peer table names it, and why it is not trained on
        assert "drive_trust_folder" in shown["node_1"].ignored
        warnings = [r for r in caplog.records if "node_1" in r.getMessage()]
        assert len(warnings) == 1 and "drive_trust_folder" in warnings[0].getMessage()
    finally:
        a.close()


def test_malformed_fork_files_are_dropped_and_counted(tmp_path):
    url = str(tmp_path / "drive")
    exp = tmp_path / "drive" / "experiments" / EXP
    stage = exp / "rollouts" / "round_3" / "stage_0"
    good = tasks(1)[0]

    def file(node, **over):
        obj = {"peer_id": node, "round": 3, "stage": 0, "timestamp": time.time(),
               "rollouts": {str(md5_id(good.question)): [fork_payload(good, ["<answer>1</answer>", "x"])]}}
        obj.update(over)
        return obj

    bad_payload = fork_payload(good, ["a"])
    cases = {
        "not_json": b"{\"peer_id\": ",
        "nan": json.dumps(file("nan", timestamp=float("nan"))).encode(),
        "wrong_round": json.dumps(file("wrong_round", round=2)).encode(),
        "other_name": json.dumps(file("someone")).encode(),
        "actions_not_text": json.dumps(file("actions_not_text", rollouts={"1": [{**bad_payload, "actions": [1, 2]}]})).encode(),
        "no_actions": json.dumps(file("no_actions", rollouts={"1": [{**bad_payload, "actions": []}]})).encode(),
        "many_actions": json.dumps(file("many_actions", rollouts={"1": [{**bad_payload, "actions": ["a"] * 65}]})).encode(),
        "question_not_text": json.dumps(file("question_not_text", rollouts={"1": [{**bad_payload, "world_state": {
            "environment_states": {"question": 5, "answer": "1"}}}]})).encode(),
        "batch_id_text": json.dumps(file("batch_id_text", rollouts={"abc": [bad_payload]})).encode(),
        "rollouts_list": json.dumps(file("rollouts_list", rollouts=[bad_payload])).encode(),
        "huge_meta": json.dumps(file("huge_meta", rollouts={"1": [fork_payload(
            type(good)("t", "d", "q", "a", {"blob": "x" * 20_000}), ["a"])]})).encode(),
        "deep": json.dumps(file("deep", rollouts={"1": [fork_payload(
            type(good)("t", "d", "q", "a", {"x": [[[[[[[[[[1]]]]]]]]]]}), ["a"])]})).encode(),
    }
    for node, data in cases.items():
        fork_register(exp, node)
        stage.mkdir(parents=True, exist_ok=True)
        (stage / f"{node}.json").write_bytes(data)
    fork_register(exp, "good")
    write_json(stage / "good.json", file("good"))
    (exp / "peers" / "badreg.json").write_text(json.dumps({"peer_id": "other", "registered_at": "soon"}))
    (stage / "badreg.json").write_text(json.dumps(file("badreg")))
    (stage / "stranger.json").write_text(json.dumps(file("stranger")))  # no registration at all

    a = comm(url, "ours", trust_folder=True, timeout=1.0)
    try:
        got = a.collect(3, 0)
        assert [g.peer for g in got] == ["fork:good"]
        c = a.counters()
        rows = by_name(c["per_peer"])
        assert rows["good"]["groups"] == 1
        for node in cases:
            assert any(k.startswith("dropped_") for k in rows[node]), (node, rows[node])
        assert rows["wrong_round"] == {"dropped_wrong_slot": 1, "name": "wrong_round"}
        assert rows["many_actions"] == {"dropped_too_large": 1, "name": "many_actions"}
        assert rows["huge_meta"] == {"dropped_too_large": 1, "name": "huge_meta"}
        assert rows["badreg"]["dropped_bad_registration"] == 1
        assert c["dropped_unregistered"] == 2  # badreg's and stranger's rollouts: no valid registration
        assert c["batches_received"] == 1
    finally:
        a.close()


def test_the_keeper_waits_for_a_live_fork_worker_until_it_submitted_the_round(tmp_path):
    """Our round clock counts a fork node as finished with round R once its reward submission for R is in the
    folder (the fork submits right after collecting, before it trains), as it counts our nodes' registrations."""
    url = str(tmp_path / "drive")
    exp = tmp_path / "drive" / "experiments" / EXP
    c = comm(url, "coord", role="coordinator", trust_folder=True, timeout=30.0)
    keeper = FolderCoordinator(c, role="coordinator", deadline=600)
    keeper.close()  # driven by hand
    try:
        fork_register(exp, "node_1")
        fork_publish(exp, "node_1", 0, tasks(1))
        c.publish(0, 0, [ours(t) for t in tasks(1, start=50)])
        assert len(c.collect(0, 0)) == 1
        keeper.report_finished(0)
        assert "node_1" in c.live() and c.live()["node_1"].progress.round == 0
        assert not keeper.step() and keeper.clock == 0  # the fork node played round 0, has not finished it
        fork_submit(exp, "node_1", 0)
        assert keeper.step() and keeper.clock == 1
        assert json.loads((exp / "state" / "current_state.json").read_text())["round"] == 1  # what the fork reads
    finally:
        c.close()


# ---- end to end: two node processes of ours and a fork worker -----------------------------------------------
class ForkWorker(threading.Thread):
    """The fork's worker loop (SwarmGameManager.run_game_round + agent_block) on files: registered once; then, for
    each round the state file shows beyond the last it played, it publishes its `.json` rollouts, fetches the
    swarm's of that round, submits its reward once it has everyone's (`peers`), and trains (here: nothing)."""

    def __init__(self, exp: Path, node: str, rounds: int, peers: set[str], role: str = "worker"):
        super().__init__(name=f"fork-{node}", daemon=True)
        self.exp, self.node, self.rounds, self.peers, self.role = exp, node, rounds, peers, role
        self.fetched: dict[int, dict[str, int]] = {}  # round -> peer -> payloads the fork can train on
        self.clock_at_submit: dict[int, int] = {}
        self.stop = threading.Event()
        fork_register(exp, node, role)

    def run(self) -> None:
        done = -1
        while done < self.rounds - 1 and not self.stop.is_set():
            r = drive_clock(self.exp.parent.parent, self.exp.name)
            if r <= done:
                self.stop.wait(0.1)
                continue
            fork_publish(self.exp, self.node, r, tasks(2, start=10 * r))
            while not self.stop.is_set():
                got = fork_fetch(self.exp, r, self.node)
                if self.peers <= set(got):
                    self.fetched[r] = {p: sum(map(len, b.values())) for p, b in got.items()}
                    break
                self.stop.wait(0.1)
            self.clock_at_submit[r] = drive_clock(self.exp.parent.parent, self.exp.name)
            fork_submit(self.exp, self.node, r)
            if self.role == "coordinator":  # it trains, then advances the swarm's round (agent_block)
                write_json(self.exp / "state" / "current_state.json",
                           {"round": r + 1, "stage": 0, "updated_at": time.time(), "updated_by": "coordinator"})
            done = r


def node_cmd(tmp_path, name, role, rounds, *settings):
    return drive_cmd(tmp_path / "drive", tmp_path / "runs" / name, name, role, rounds, "collect_timeout=240",
                     "round_deadline=240", *settings, experiment=EXP)


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_a_fork_worker_and_two_of_ours_learn_from_each_other(tmp_path, procs):
    """drive_trust_folder on: every round each of ours trains on the fork worker's groups as well as the other's,
    the fork worker parses both of ours' `.json` copies and follows our coordinator's clock. (collect_peers=2:
    each of ours waits for the two others however late one of them starts; that the clock waits for a fork
    node's submission is the keeper test's, above.)"""
    rounds = 3
    exp = tmp_path / "drive" / "experiments" / EXP
    fork = ForkWorker(exp, "fork_1", rounds, {"coord", "w1"})
    fork.start()
    try:
        for n in ("coord", "w1"):
            procs.start(n, node_cmd(tmp_path, n, "coordinator" if n == "coord" else "worker", rounds,
                                    "drive_trust_folder=true", "collect_peers=2"))
        for n in ("coord", "w1"):
            procs.wait_exit(n, HANG)
        fork.join(HANG)
    finally:
        fork.stop.set()
    assert not fork.is_alive()
    for n in ("coord", "w1"):
        rows = metrics(tmp_path, n)
        assert [m["round"] for m in rows] == list(range(rounds))
        assert [m["swarm_groups_received"] for m in rows] == [4 + 2] * rounds, n  # the other's 4 tasks, the fork's 2
        fork_row = by_name(rows[-1]["comm"]["per_peer"])["fork_1"]
        assert (fork_row["batches"], fork_row["groups"]) == (rounds, 2 * rounds)
        assert "ignoring rl-swarm fork node" not in procs.log(n)
    assert fork.fetched == {r: {"coord": 4, "w1": 4} for r in range(rounds)}
    assert set(fork.clock_at_submit) == set(range(rounds))  # it played every round our clock showed


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_without_the_setting_a_forks_files_are_dropped_and_the_node_trains_on(tmp_path, procs):
    exp = tmp_path / "drive" / "experiments" / EXP
    fork_register(exp, "fork_1")
    for r in range(2):
        fork_publish(exp, "fork_1", r, tasks(2, start=10 * r))
    procs.start("coord", node_cmd(tmp_path, "coord", "coordinator", 2))
    procs.wait_exit("coord", HANG)
    rows = metrics(tmp_path, "coord")
    assert [m["swarm_groups_received"] for m in rows] == [0, 0]
    comm_counters = rows[-1]["comm"]
    assert comm_counters["dropped_unsigned_fork"] == 3  # its registration and both rollout files
    assert by_name(comm_counters["per_peer"])["fork_1"]["dropped_unsigned_fork"] == 3
    assert procs.log("coord").count("ignoring rl-swarm fork node fork_1") == 1
    assert not list(exp.glob("rollouts/*/stage_0/coord.json"))


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
def test_a_fork_coordinator_paces_two_of_our_workers(tmp_path, procs):
    """The fork's coordinator trains too and advances its state file once it finished a round (agent_block); our
    workers, with drive_trust_folder on, follow that file and wait for its rollouts as for a member's, and the
    fork's coordinator counts them among its workers (get_active_workers: peers/*.json names)."""
    rounds = 2
    exp = tmp_path / "drive" / "experiments" / EXP

    write_json(exp / "state" / "current_state.json",  # the fork's init_experiment
               {"round": 0, "stage": 0, "created_at": time.time(), "experiment_name": EXP, "config_overrides": {}})
    fork = ForkWorker(exp, "node_0", rounds, {"w1", "w2"}, role="coordinator")
    fork.start()
    try:
        for n in ("w1", "w2"):
            procs.start(n, node_cmd(tmp_path, n, "worker", rounds, "drive_trust_folder=true", "collect_peers=2"))
        for n in ("w1", "w2"):
            procs.wait_exit(n, HANG)
        fork.join(HANG)
    finally:
        fork.stop.set()
    for n in ("w1", "w2"):
        rows = metrics(tmp_path, n)
        assert [m["swarm_groups_received"] for m in rows] == [4 + 2] * rounds, n
    assert fork.fetched == {r: {"w1": 4, "w2": 4} for r in range(rounds)}
    state = json.loads((exp / "state" / "current_state.json").read_text())
    assert state["updated_by"] == "coordinator" and state["round"] == rounds  # the fork's file, only the fork wrote it
    workers = [f.stem for f in (exp / "peers").glob("*.json") if not (f.stem.startswith("node_0") or "coordinator" in f.stem)]
    assert sorted(workers) == ["w1", "w2"]

"""`--comm auto` and `--comm hybrid`: the DHT when it can be had, the shared folder otherwise, and a bridge
node that lets DHT peers and Drive peers learn from each other. Real processes, a real folder."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from conftest import cli
from test_hivemind import EXP, Procs, metrics, start_bootstrap, wait_exit


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def node(tmp, name, rounds, *extra):
    return cli("run", "--headless", "--experiment", EXP, "--node-id", name, "--rounds", str(rounds),
               "--host", "127.0.0.1", "--output-dir", str(tmp / "runs" / name), "--drive-path", str(tmp / "drive"),
               "--set", "eval_every=0", "--set", "threads=1", "--set", "tasks_per_round=4",
               "--set", "collect_timeout=10", "--set", "drive_poll_interval=0.2", *extra)


@pytest.mark.slow
def test_auto_falls_back_to_drive_when_the_bootstrap_is_unreachable(procs, tmp_path):
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    t0 = time.monotonic()
    p = procs.start("lonely", node(tmp_path, "lonely", 2, "--comm", "auto", "--initial-peers", dead))
    procs.wait_for("lonely", r"the DHT is out of reach .*cannot reach any initial peer.*running in Drive mode", 90)
    fell_back = time.monotonic() - t0
    wait_exit(p, 120, procs.log("lonely"))
    assert fell_back < 60, fell_back
    shared = tmp_path / "drive" / "experiments" / EXP
    assert (shared / "rollouts" / "round_1" / "stage_0" / "lonely.msgpack").exists()
    assert (shared / "peers" / "lonely.json").exists()
    assert [r["round"] for r in metrics(tmp_path, "lonely")] == [0, 1]


@pytest.mark.slow
def test_hybrid_node_bridges_dht_and_drive_peers(procs, tmp_path):
    boot = start_bootstrap(procs, "boot", "--coordinator")
    # The Drive-only peer is there first and waits for two peers' batches a round (the bridge's own and
    # the one it relays), so that it does not train alone before the others are up.
    procs.start("drive", node(tmp_path, "drive", 3, "--comm", "drive", "--set", "collect_peers=2",
                              "--set", "collect_timeout=30"))
    deadline = time.monotonic() + 120
    while not (tmp_path / "drive" / "experiments" / EXP / "peers" / "drive.json").exists():
        assert time.monotonic() < deadline and procs.procs["drive"].poll() is None, procs.log("drive")[-3000:]
        time.sleep(0.2)
    # The DHT-only peer waits for two batches a round too: the bridge's own and the one it relays.
    procs.start("dht", node(tmp_path, "dht", 3, "--comm", "hivemind", "--initial-peers", boot,
                            "--set", "collect_peers=2", "--set", "collect_timeout=30"))
    procs.start("bridge", node(tmp_path, "bridge", 3, "--comm", "hybrid", "--initial-peers", boot))
    for n in ("dht", "bridge", "drive"):
        wait_exit(procs.procs[n], 180, procs.log(n))
    ids = {n: re.search(r"\(peer (\w+)\)", procs.log(n)).group(1) for n in ("dht", "bridge", "drive")}
    # The DHT-only peer got the Drive-only peer's batches, relayed by the bridge with their signature intact.
    per_peer = metrics(tmp_path, "dht")[-1]["comm"]["per_peer"]
    relayed = per_peer[ids["drive"][-8:]]
    assert relayed["groups"] > 0 and relayed["relayed"] >= 1, per_peer
    assert per_peer["bridge"]["groups"] > 0
    # The Drive-only peer got the DHT-only peer's batches through the folder.
    files = list((tmp_path / "drive" / "experiments" / EXP / "rollouts").glob(f"round_*/stage_0/bridge~{ids['dht']}.msgpack"))
    assert files, "the bridge wrote no relayed files"
    received = [json.loads(line) for line in (tmp_path / "runs" / "drive" / "events.jsonl").read_text().splitlines()]
    senders = {p for e in received if e.get("kind") == "rollouts_received" for p in e.get("peers", [])}
    assert {ids["dht"], ids["bridge"]} <= senders, senders
    # Nobody counted the relays as forgeries.
    for n in ("dht", "drive"):
        comm = metrics(tmp_path, n)[-1]["comm"]
        assert not any(v for k, v in comm.items() if k.startswith("dropped_wrong_peer") or k.startswith("dropped_bad_signature")), comm

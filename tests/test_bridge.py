"""`--comm auto` and `--comm hybrid`: the DHT when it can be had, the shared folder otherwise, and a bridge
node that lets DHT peers and Drive peers learn from each other. Real processes, a real folder."""

from __future__ import annotations


import pytest

from helpers import (ENDLESS, HANG, HM_EXP, PROCESS_TEST_TIMEOUT, by_name, events, kill_tree, metrics, node_cmd, sets,
                     start_bootstrap, wait_until)

pytestmark = pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
EXP = HM_EXP


def node(tmp, name, rounds, *extra):
    (tmp / "drive").mkdir(exist_ok=True)  # the shared folder is there, as a mounted Drive is: workers refuse a missing one
    return node_cmd(tmp / "runs" / name, name, rounds, "--drive-path", str(tmp / "drive"),
                    *sets("collect_timeout=10", "drive_poll_interval=0.2"), *extra)


@pytest.mark.slow
def test_auto_falls_back_to_drive_when_the_bootstrap_is_unreachable(procs, tmp_path):
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    procs.start("lonely", node(tmp_path, "lonely", 2, "--comm", "auto", "--initial-peers", dead))
    procs.wait_for("lonely", r"the DHT is out of reach .*cannot reach any initial peer.*running in Drive mode", HANG)
    procs.wait_exit("lonely", HANG)
    shared = tmp_path / "drive" / "experiments" / EXP
    assert (shared / "rollouts" / "round_1" / "stage_0" / "lonely.msgpack").exists()
    assert (shared / "peers" / "lonely.json").exists()
    assert [r["round"] for r in metrics(tmp_path, "lonely")] == [0, 1]


@pytest.mark.slow
def test_hybrid_node_bridges_dht_and_drive_peers(procs, tmp_path):
    """Every node waits for the batches it should get each round (the bridge: one from each side; the others:
    the bridge's own and the one it relays), so the three play each round together however slowly each starts.
    They play on until the test has seen three rounds (a node that ends its run stops serving its last batch
    at once, and the others would wait out their collect timeout without it), then it kills them."""
    boot = start_bootstrap(procs, "boot", "--coordinator")
    # The Drive-only peer is there first and waits for two peers' batches a round (the bridge's own and
    # the one it relays), so that it does not train alone before the others are up.
    procs.start("drive", node(tmp_path, "drive", ENDLESS, "--comm", "drive", *sets("collect_peers=2", "collect_timeout=240")))
    wait_until(lambda: (tmp_path / "drive" / "experiments" / EXP / "peers" / "drive.json").exists()
               or procs["drive"].poll() is not None, HANG, "the Drive-only peer's registration", lambda: procs.log("drive"))
    assert procs["drive"].poll() is None, procs.log("drive")[-3000:]
    # The DHT-only peer waits for two batches a round too: the bridge's own and the one it relays.
    procs.start("dht", node(tmp_path, "dht", ENDLESS, "--comm", "hivemind", "--initial-peers", boot,
                            *sets("collect_peers=2", "collect_timeout=240")))
    # The bridge waits for one batch a round on each side: the DHT-only peer's and the Drive-only peer's.
    procs.start("bridge", node(tmp_path, "bridge", ENDLESS, "--comm", "hybrid", "--initial-peers", boot,
                               *sets("collect_peers=1", "collect_timeout=240")))
    wait_until(lambda: all(len(metrics(tmp_path, n)) >= 3 for n in ("dht", "bridge", "drive")), HANG,
               "three rounds played by each", lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in ("dht", "bridge", "drive")))
    for n in ("dht", "bridge", "drive"):
        kill_tree(procs[n])
    ids = {n: procs.peer_id(n) for n in ("dht", "bridge", "drive")}
    # The DHT-only peer got the Drive-only peer's batches, relayed by the bridge with their signature intact.
    per_peer = metrics(tmp_path, "dht")[-1]["comm"]["per_peer"]
    relayed = per_peer[ids["drive"]]
    assert relayed["groups"] > 0 and relayed["relayed"] >= 1, per_peer
    assert by_name(per_peer)["bridge"]["groups"] > 0
    # The Drive-only peer got the DHT-only peer's batches through the folder.
    files = list((tmp_path / "drive" / "experiments" / EXP / "rollouts").glob(f"round_*/stage_0/bridge~{ids['dht']}.msgpack"))
    assert files, "the bridge wrote no relayed files"
    senders = {p for e in events(tmp_path, "drive") if e.get("kind") == "rollouts_received" for p in e.get("peers", [])}
    assert {ids["dht"], ids["bridge"]} <= senders, senders
    # Each round, both one-sided peers got both batches: the bridge's own and the other side's.
    for n in ("dht", "drive"):
        assert [(r["round"], r["swarm_groups_received"]) for r in metrics(tmp_path, n)[:3]] == [(r, 2 * 4) for r in range(3)]
    # Nobody counted the relays as forgeries.
    for n in ("dht", "drive"):
        comm = metrics(tmp_path, n)[-1]["comm"]
        assert not any(v for k, v in comm.items() if k.startswith("dropped_wrong_peer") or k.startswith("dropped_bad_signature")), comm

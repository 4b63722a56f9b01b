"""The swarm over hivemind, as users run it: a bootstrap peer and peer processes on 127.0.0.1.

Every process is started in its own session and killed by PID (with its p2pd) at the end; every wait is
bounded."""

from __future__ import annotations

import json
import re
import signal
import sys

import pytest

from helpers import (ENDLESS, HANG, HM_EXP, PROCESS_TEST_TIMEOUT, ROOT, alive, by_name, children, events, kill_tree,
                     metrics, peer_cmd, start_bootstrap, wait_until)

pytestmark = pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
EXP = HM_EXP
ACTORS = str(ROOT / "tests" / "hivemind_actors.py")


def play_until(procs, tmp_path, names, rounds: int) -> dict[str, list[dict]]:
    """Wait until each node has played `rounds` rounds, then kill them; their first `rounds` metrics rows.
    The nodes were started with more rounds than that: a node that ends its run closes its payload server at
    once, so a peer that had not fetched its last batch yet would wait out its collect timeout without it."""
    wait_until(lambda: all(len(metrics(tmp_path, n)) >= rounds for n in names), HANG, f"{rounds} rounds played by each",
               lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in names))
    for n in names:
        kill_tree(procs[n])
    return {n: metrics(tmp_path, n)[:rounds] for n in names}


@pytest.mark.slow
def test_bootstrap_and_three_peers_one_in_client_mode(procs, tmp_path):
    boot = start_bootstrap(procs, "boot", "--coordinator")
    names = ["ann", "bob", "cat"]
    for n in names:  # each waits for both others' batches (so a slow starter does not miss round 0)
        procs.start(n, peer_cmd(tmp_path, n, boot, ENDLESS, "--set", "collect_peers=2", "--set", "collect_timeout=240",
                                *(["--client-mode"] if n == "cat" else [])))
    played = play_until(procs, tmp_path, names, 3)
    peer_ids = {n: procs.peer_id(n) for n in names}
    assert len(set(peer_ids.values())) == 3
    for n in names:
        rows = played[n]
        assert [r["round"] for r in rows] == [0, 1, 2], (n, procs.log(n)[-2000:])  # the clock advanced together
        per_peer = rows[-1]["comm"]["per_peer"]
        others = {m for m in names if m != n}
        senders = {name for name, c in by_name(per_peer).items() if c.get("groups", 0) > 0}
        assert others <= senders, (n, per_peer)  # swarm groups from both others, the client-mode peer included
        assert all(r["swarm_groups_received"] >= 4 for r in rows), n
        assert rows[-1]["comm"]["peers_seen"] >= 2
    # The bootstrap kept the clock: it saw each round finished by all three trainers.
    procs.wait_for("boot", r"round clock advanced to round 2 \(3 of 3", 60)
    procs.wait_for("boot", r"status: \d+ peer\(s\) connected", 60)
    # SIGTERM stops it cleanly, p2pd included.
    daemons = children(procs["boot"].pid)
    procs.stop("boot")
    assert "stopped" in procs.log("boot")
    wait_until(lambda: not any(alive(d) for d in daemons), 60, "exit of the bootstrap's p2pd")
    # Restarted with its identity, the bootstrap is the same peer and its clock resumes where it was.
    again = start_bootstrap(procs, "boot2", "--coordinator", "--identity", "boot.key")
    assert again.rsplit("/", 1)[1] == boot.rsplit("/", 1)[1]
    last = re.findall(r"round clock advanced to round (\d+)", procs.log("boot"))[-1]
    procs.wait_for("boot2", rf"round clock resumed at round {last} ", 60)


@pytest.mark.slow
def test_peers_follow_the_bootstraps_topic_shards_and_play_on(procs, tmp_path):
    """`bootstrap --coordinator --shard-size N` splits the topic once it counts more than N trainers; the
    nodes follow its clock into their shards and keep playing rounds across the move."""
    boot = start_bootstrap(procs, "boot", "--coordinator", "--shard-size", "1")
    names = ["ann", "bob"]
    for n in names:
        procs.start(n, peer_cmd(tmp_path, n, boot, ENDLESS))
    procs.wait_for("boot", r"2 live trainer\(s\): the topic goes from 1 to 2 shard\(s\)", HANG)
    sharded = lambda n: [r["round"] for r in metrics(tmp_path, n) if r["comm"].get("gossip_shards") == 2]  # noqa: E731
    wait_until(lambda: all(len(sharded(n)) >= 2 for n in names), HANG, "two rounds played by each in 2 shards",
               lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in names))
    for n in names:
        assert "the swarm's topic is in 2 shard(s): this peer is in shard" in procs.log(n)
        rounds = [r["round"] for r in metrics(tmp_path, n)]
        assert rounds == sorted(set(rounds)), (n, rounds)  # no round played twice across the move
    procs.wait_for("boot", r"status: .* in 2 topic shards", 60)


def checkpoint_rounds(run) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("round_*")) if folder.exists() else []


def groups_from(row: dict, name: str) -> int:
    return by_name(row["comm"]["per_peer"]).get(name, {}).get("groups", 0)


def clock_round(boot_log: str) -> int:
    """The last round the bootstrap's clock advanced to (0 before it moved)."""
    moves = re.findall(r"round clock advanced to round (\d+)", boot_log)
    return int(moves[-1]) if moves else 0


@pytest.mark.slow
def test_killed_peer_does_not_stall_the_swarm_and_resumes_with_its_identity(procs, tmp_path):
    """ann and bob play until the test stops them, so the swarm cannot finish while bob is away, however
    slowly he restarts on a busy machine."""
    boot = start_bootstrap(procs, "boot", "--coordinator")
    common = ("--set", "checkpoint_every=1", "--set", "collect_timeout=4")
    procs.start("ann", peer_cmd(tmp_path, "ann", boot, ENDLESS, *common))
    victim = procs.start("bob", peer_cmd(tmp_path, "bob", boot, ENDLESS, *common))
    bob_run = tmp_path / "runs" / "bob"

    def bob_checkpointed_two_rounds():
        rows = metrics(tmp_path, "bob")
        return len(rows) >= 2 and rows[-1]["round"] in checkpoint_rounds(bob_run)

    wait_until(bob_checkpointed_two_rounds, HANG, "two rounds played and checkpointed by bob", lambda: procs.log("bob"))
    bob_id = procs.peer_id("bob")
    daemons = children(victim.pid)
    assert daemons, "the peer runs its p2pd as a child"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    saved = checkpoint_rounds(bob_run)[-1]
    played_before = [r["round"] for r in metrics(tmp_path, "bob")]
    killed_at = max([r["round"] for r in metrics(tmp_path, "ann")], default=-1)  # ann's last finished round
    wait_until(lambda: not any(alive(d) for d in daemons), 60, "exit of the killed node's p2pd")
    # ann keeps training: bob drops out of her member list (his record expires) and her rounds go on
    # without waiting for him; so does the bootstrap's clock.

    def ann_went_on_without_bob():
        rows = [r for r in metrics(tmp_path, "ann") if r["round"] > killed_at]
        gone = [i for i, r in enumerate(rows) if r["comm"]["peers_live"] == 0]
        return rows[gone[0] + 1:gone[0] + 3] if gone and len(rows) >= gone[0] + 3 else None

    after = wait_until(ann_went_on_without_bob, HANG, "two rounds of ann's after bob left her member list",
                       lambda: procs.log("ann"))
    assert all(r["swarm_groups_received"] == 0 for r in after), after  # nothing from the dead peer
    wait_until(lambda: clock_round(procs.log("boot")) > saved + 1, HANG, "the clock moving on without bob",
               lambda: procs.log("boot"))
    clock_then = clock_round(procs.log("boot"))
    from_bob = groups_from(after[-1], "bob")  # what ann had from bob before he died
    # bob comes back with the same identity file: same peer id, resumes from his checkpoint, joins the swarm
    # at its round, and the two learn from each other again.
    procs.start("bob2", peer_cmd(tmp_path, "bob", boot, ENDLESS, *common))
    procs.wait_for("bob2", rf"resumed from \S+round_{saved:06d}$", HANG)
    assert procs.peer_id("bob2") == bob_id

    def back_in_the_swarm():
        new = [r for r in metrics(tmp_path, "bob") if r["round"] > saved]
        to_ann = groups_from(metrics(tmp_path, "ann")[-1], "bob")
        return len(new) >= 2 and any(r["swarm_groups_received"] > 0 for r in new) and to_ann > from_bob

    wait_until(back_in_the_swarm, HANG, "two rounds of bob's after his restart, with ann's rollouts and his reaching her",
               lambda: procs.log("bob2") + procs.log("ann")[-1500:])
    procs.stop("bob2")
    procs.stop("ann")
    rounds = [r["round"] for r in metrics(tmp_path, "bob")]
    assert rounds == sorted(set(rounds)), rounds  # no round twice, none rewound
    assert [r for r in rounds if r <= saved] == [r for r in played_before if r <= saved]  # his history kept
    new = [r for r in rounds if r > saved]
    # From his checkpoint on, every round was either played or skipped to follow the swarm's clock.
    log = events(tmp_path, "bob")
    restart = max(i for i, e in enumerate(log) if e["kind"] == "node_started")
    skipped = [r for e in log[restart:] if e["kind"] == "rounds_skipped" for r in range(e["first"], e["last"] + 1)]
    assert sorted(skipped + new) == list(range(saved + 1, new[-1] + 1)), (skipped, new)
    assert new[0] >= clock_then  # he joined at the swarm's round, not replaying the ones he missed
    assert checkpoint_rounds(bob_run)[-1] == new[-1]  # and stopped cleanly, with a final checkpoint


@pytest.mark.slow
def test_hostile_peer_is_dropped_and_counted(procs, tmp_path):
    boot = start_bootstrap(procs, "boot", "--coordinator")
    # Mallory announces one bad batch a round, the kinds in turn, for 40 rounds.
    procs.start("mallory", [sys.executable, ACTORS, "hostile", "mallory.key", EXP, "40", boot])
    procs.wait_for("mallory", r"announced round 39", HANG)
    for n in ("ann", "bob"):
        # collect_peers=1: wait for one valid batch (the attacker's never count), so both play every round together
        # ban_strikes=0: every attack kind is seen and counted (a ban would stop looking after three)
        procs.start(n, peer_cmd(tmp_path, n, boot, ENDLESS, "--set", "collect_timeout=240", "--set", "collect_peers=1",
                                "--set", "ban_strikes=0"))
    for n in ("ann", "bob"):  # mallory tries to overwrite both honest member records while they run
        procs.wait_for("mallory", rf"^overwrite {procs.peer_id(n)}: forged stored=False", HANG)
    reasons = ("bad_signature", "malformed", "too_large", "wrong_slot", "wrong_swarm")

    def every_kind_counted(n: str) -> bool:
        rows = metrics(tmp_path, n)
        mallory = by_name(rows[-1]["comm"]["per_peer"]).get("mallory", {}) if rows else {}
        return all(mallory.get(f"dropped_{r}", 0) >= 1 for r in reasons)

    # A collect ends once the honest batch is in, and a pull of mallory's still in flight is dropped uncounted;
    # so the test plays until each node has met every kind (one round each is not guaranteed on a fast machine).
    wait_until(lambda: all(every_kind_counted(n) for n in ("ann", "bob")), HANG, "every attack kind counted by both",
               lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in ("ann", "bob")))
    played = play_until(procs, tmp_path, ("ann", "bob"), 5)
    for n, other in (("ann", "bob"), ("bob", "ann")):
        rows = played[n]
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
        comm = metrics(tmp_path, n)[-1]["comm"]  # the last round played: every drop so far counted
        per_peer = by_name(comm["per_peer"])
        assert per_peer[other]["groups"] >= 5 * 4  # the honest peer's groups, every round
        assert per_peer["mallory"].get("groups", 0) == 0  # nothing of the attacker's reached the trainer
        for reason in reasons:
            assert comm.get(f"dropped_{reason}", 0) >= 1, (n, reason, comm)
            assert per_peer["mallory"].get(f"dropped_{reason}", 0) >= 1
        assert all(r["swarm_groups_received"] == 4 for r in rows)  # only the honest peer's 4 groups a round
    # The forged member records never replaced the honest ones: both finished under their own names.
    assert "pwned" not in json.dumps(metrics(tmp_path, "ann")[-1]["comm"]["per_peer"])


def one_line_error(procs, name: str, timeout: float = HANG) -> str:
    """The one `error: ` line of a process that must fail at start (no traceback)."""
    assert procs.wait_exit(name, timeout, rc=None) != 0, procs.log(name)[-3000:]
    log = procs.log(name)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    return errors[0]


@pytest.mark.slow
def test_startup_errors_are_one_line(procs, tmp_path):
    boot = start_bootstrap(procs, "boot")
    port = int(re.search(r"/tcp/(\d+)/", boot).group(1))
    # Port taken.
    procs.start("dup", [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", str(port),
                        "--identity", "dup.key"])
    assert "already in use" in one_line_error(procs, "dup")
    # Nobody at the bootstrap address.
    dead = re.sub(r"/tcp/\d+/", "/tcp/1/", boot)
    procs.start("lost", peer_cmd(tmp_path, "lost", dead, 1))
    assert "cannot reach any initial peer" in one_line_error(procs, "lost")
    # The bootstrap's own identity, while it runs.
    procs.start("twin", peer_cmd(tmp_path, "twin", boot, 1, "--identity", str(tmp_path / "boot.key")))
    assert "already used by a running peer" in one_line_error(procs, "twin")
    # A bootstrap whose clock is 30 s ahead (measured over a round trip: within half of it on a busy machine).
    procs.start("skewed", [sys.executable, ACTORS, "skewed", "skewed.key", "30"])
    skewed = procs.wait_for("skewed", r"^(/ip4/\S+)$", HANG).group(1)
    procs.start("late", peer_cmd(tmp_path, "late", skewed, 1))
    off = re.search(r"this machine's clock is ([-+]\d+\.\d) s off the bootstrap peer's", one_line_error(procs, "late"))
    assert off and -40 < float(off.group(1)) < -20, off

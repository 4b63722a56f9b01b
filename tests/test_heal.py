"""The swarm heals after any restart: a bootstrap peer that keeps the round clock is SIGKILLed and restarted
on its port and identity while three peers run, and a peer is restarted after that.

Everything is observed through what the processes write (metrics.jsonl, log lines), every wait is bounded,
and every process (with its p2pd) is killed at the end (tests/helpers.py)."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import pytest

from helpers import (ENDLESS, HANG, PROCESS_TEST_TIMEOUT, alive, by_name, children, metrics, peer_cmd,
                     start_bootstrap, wait_until)
from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig
from p2pswarm.comm.hivemind.redial import Redialer, split_maddr
from p2pswarm.identity import Identity

pytestmark = pytest.mark.timeout(PROCESS_TEST_TIMEOUT)
NAMES = ("ann", "bob", "cat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heard(tmp_path, name: str) -> dict[str, int]:
    """Groups `name` has received from each other peer so far (by name), from its last metrics row."""
    rows = metrics(tmp_path, name)
    return {n: row.get("groups", 0) for n, row in by_name(rows[-1]["comm"]["per_peer"]).items()} if rows else {}


def hears_since(tmp_path, name: str, others, before: dict[str, int]) -> bool:
    now = heard(tmp_path, name)
    return all(now.get(o, 0) > before.get(o, 0) for o in others)


def clock_moves(log: str) -> list[int]:
    return [int(r) for r in re.findall(r"round clock advanced to round (\d+)", log)]


def last_round(tmp_path, name: str) -> int:
    rows = metrics(tmp_path, name)
    return rows[-1]["round"] if rows else -1


@pytest.mark.slow
def test_swarm_heals_after_the_bootstrap_and_a_peer_restart(procs, tmp_path):
    port = free_port()
    boot = start_bootstrap(procs, "boot", "--coordinator", "--port", str(port))
    boot_id = boot.rsplit("/", 1)[1]
    for n in NAMES:
        procs.start(n, peer_cmd(tmp_path, n, boot, ENDLESS))
    logs = lambda *names: lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in names)  # noqa: E731
    wait_until(lambda: all(hears_since(tmp_path, n, set(NAMES) - {n}, {}) for n in NAMES), HANG,
               "groups from both others at each peer", logs(*NAMES))

    # SIGKILL: the keeper's p2pd follows it; the peers' next DHT requests to it fail, which drops it from
    # their routing tables (what used to cut it off for good).
    daemons = children(procs["boot"].pid)
    procs["boot"].send_signal(signal.SIGKILL)
    procs["boot"].wait(timeout=30)
    wait_until(lambda: not any(alive(d) for d in daemons), 60, "exit of the killed bootstrap's p2pd")
    played = {n: len(metrics(tmp_path, n)) for n in NAMES}
    wait_until(lambda: all(len(metrics(tmp_path, n)) > played[n] + 1 for n in NAMES), HANG,
               "two rounds of each peer's without the bootstrap", logs(*NAMES))

    # Restarted on its port and identity, it finds the swarm again: it dials the peers it knew (its state
    # dir), they dial it; its clock resumes from disk, then catches up with the swarm's round and moves on.
    again = start_bootstrap(procs, "boot2", "--coordinator", "--identity", "boot.key", "--port", str(port))
    assert again == boot
    resumed = int(procs.wait_for("boot2", r"round clock resumed at round (\d+) ", 60).group(1))
    swarm_round = max(last_round(tmp_path, n) for n in NAMES)
    before = {n: heard(tmp_path, n) for n in NAMES}
    procs.wait_for("boot2", r"status: \d+ peer\(s\) connected, 3 trainer\(s\)", HANG)
    for n in NAMES:
        procs.wait_for(n, rf"reached peer {boot_id} again after", HANG)
    wait_until(lambda: max(clock_moves(procs.log("boot2")), default=-1) > swarm_round + 1, HANG,
               f"the restarted keeper's clock past round {swarm_round + 1}", logs("boot2", *NAMES))
    moves = clock_moves(procs.log("boot2"))
    assert moves == sorted(set(moves)) and moves[0] > resumed, moves  # never back, never a round twice
    wait_until(lambda: all(hears_since(tmp_path, n, set(NAMES) - {n}, before[n]) for n in NAMES), HANG,
               "new groups from both others at each peer", logs(*NAMES))

    # A peer restarted now joins through the restarted bootstrap and hears the whole swarm (not a second
    # swarm of its own with the bootstrap), and the others hear it.
    procs["cat"].send_signal(signal.SIGKILL)
    procs["cat"].wait(timeout=30)
    rows_before = len(metrics(tmp_path, "cat"))
    before = {n: heard(tmp_path, n) for n in NAMES}
    procs.start("cat2", peer_cmd(tmp_path, "cat", boot, ENDLESS))

    def cat_back() -> bool:  # its counters start again from zero in the new process
        new = metrics(tmp_path, "cat")[rows_before:]
        return bool(new) and hears_since(tmp_path, "cat", {"ann", "bob"}, {})

    wait_until(cat_back, HANG, "groups from ann and bob at the restarted cat", logs("cat2", "boot2"))
    wait_until(lambda: all(hears_since(tmp_path, n, {"cat"}, before[n]) for n in ("ann", "bob")), HANG,
               "the restarted cat's groups at ann and bob", logs("ann", "bob", "cat2"))
    moves = clock_moves(procs.log("boot2"))
    assert moves == sorted(set(moves)), moves


def in_table(node: HivemindNode, other: HivemindNode) -> bool:
    return any(p.to_base58() == other.peer_id for p in list(node.dht.protocol.routing_table.peer_id_to_uid))


def test_a_restarted_bootstrap_dials_the_valid_peers_of_its_book(tmp_path):
    """The book a bootstrap keeps is read back like anything from the network: the valid entries are dialled
    (and the node is back in their routing tables), the bad ones are dropped and counted, and a file that is
    no book at all leaves the node as it would be without one."""
    started: list[HivemindNode] = []

    def node(name: str, **net) -> HivemindNode:
        started.append(HivemindNode(Identity.load_or_create(tmp_path / f"{name}.key"), tmp_path / f"{name}.key",
                                    NetConfig(host="127.0.0.1", **net)).start())
        return started[-1]

    try:
        a = node("a")
        b = node("b", initial_peers=a.maddrs)
        others = [Identity.load_or_create(tmp_path / f"other{i}.key").peer_id for i in range(6)]  # valid ids
        seen = time.time() - 60
        good = {n.peer_id: {"addrs": [split_maddr(n.maddrs[0])[0]], "seen": seen} for n in (a, b)}
        bad = {
            "not-a-peer-id": {"addrs": ["/ip4/127.0.0.1/tcp/1"], "seen": seen},
            "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N": {"addrs": ["/ip4/127.0.0.1/tcp/1"], "seen": seen},  # RSA
            others[0]: {"addrs": [f"/ip4/127.0.0.1/tcp/1/p2p/{others[0]}"], "seen": seen},  # an address with /p2p/
            others[1]: {"addrs": "/ip4/127.0.0.1/tcp/1", "seen": seen},
            others[2]: {"addrs": ["not a multiaddr"], "seen": seen},
            others[3]: {"addrs": ["/ip4/127.0.0.1/tcp/1"], "seen": 1e300},  # from the future
            others[4]: ["/ip4/127.0.0.1/tcp/1"],
            others[5]: {"addrs": ["/ip4/127.0.0.1/tcp/1"], "seen": "yesterday"},
        }
        book = tmp_path / "state" / "known_peers.json"
        book.parent.mkdir()
        book.write_text(json.dumps({"version": 1, "peers": {**bad, **good}}))
        boot = node("boot", known_peers=str(book))
        wait_until(lambda: all(in_table(boot, n) and in_table(n, boot) for n in (a, b))
                   and boot.redialer.counters()["peers_reached_again"] == 2, 60,
                   "a and b in the restarted bootstrap's routing table and it in theirs")
        assert set(boot.redialer.book) == {a.peer_id, b.peer_id}
        assert boot.redialer.dropped == len(bad)
        # It writes back what it knows now: the two peers, nothing of the bad entries.
        wait_until(lambda: set(json.loads(book.read_text())["peers"]) == {a.peer_id, b.peer_id}, 30,
                   "the book rewritten")
        for junk in (b"\xff\xfe", b"[" * 100_000, b'{"peers": []}', b'{"version": 1}', b"null", b"NaN"):
            book.write_bytes(junk)
            assert Redialer(a, [], path=book).book == {}
    finally:
        for n in started:
            n.close()

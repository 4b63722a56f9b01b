"""Pure functions of the benchmarks that their results rest on: how clock groups and partitions are told
apart in a fault run's timeline (bench/chaos.py), and how a peer's traffic in a window is taken from
per-socket counter samples (bench/swarm_exchange.py)."""

from __future__ import annotations

import importlib.util
import sys

from helpers import ROOT


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


chaos = _bench("chaos")
swarm_exchange = _bench("swarm_exchange")


def test_nodes_a_round_or_two_apart_are_one_swarm():
    assert chaos.clock_groups({"a": 10, "b": 11, "c": 12}, tolerance=2) == [["a", "b", "c"]]
    assert chaos.clock_groups({}, tolerance=2) == []


def test_a_node_far_behind_is_a_group_of_its_own():
    assert chaos.clock_groups({"a": 10, "b": 11, "c": 58}, tolerance=2) == [["a", "b"], ["c"]]
    # chained: each within tolerance of the next is still one group, a gap anywhere splits it
    assert chaos.clock_groups({"a": 1, "b": 3, "c": 5, "d": 9}, tolerance=2) == [["a", "b", "c"], ["d"]]


def test_partitions_are_intervals_with_more_than_one_group():
    timeline = [
        (0.0, {"a": 5, "b": 5, "c": 5}),
        (1.0, {"a": 6, "b": 6}),  # c killed: not a partition, just fewer nodes
        (2.0, {"a": 7, "b": 7, "c": 1}),  # c back on its own clock
        (5.0, {"a": 8, "b": 8, "c": 2}),
        (9.0, {"a": 9, "b": 9, "c": 9}),  # healed
        (10.0, {"a": 10, "b": 10, "c": 30}),  # c jumps ahead: a new partition, open at the end
        (12.5, {"a": 11, "b": 11, "c": 31}),
    ]
    parts = chaos.partitions(timeline, tolerance=2)
    assert [(p["start"], p["end"], p["duration_s"], p["open"]) for p in parts] == [(2.0, 9.0, 7.0, False),
                                                                                  (10.0, 12.5, 2.5, True)]
    assert parts[0]["groups"] == [{"nodes": ["c"], "round": 1}, {"nodes": ["a", "b"], "round": 7}]
    assert parts[0]["max_round_spread"] == 6
    assert chaos.partitions([], tolerance=2) == []


def test_first_time_looks_from_a_moment_on():
    samples = [(1.0, 0), (2.0, 3), (3.0, 1), (4.0, 3)]
    assert chaos.first_time(samples, 0.0, lambda v: v >= 3) == 2.0
    assert chaos.first_time(samples, 2.5, lambda v: v >= 3) == 4.0
    assert chaos.first_time(samples, 4.5, lambda v: v >= 3) is None


def test_socket_meter_counts_a_window_from_the_samples_around_it():
    m = swarm_exchange.SocketMeter()
    pid = 7
    # (bytes sent, bytes received, data segments out, in) per socket inode, as tcp_info reports them
    m.samples = [
        (0.0, {pid: {1: (100, 50, 1, 1)}}),
        (1.0, {pid: {1: (300, 150, 3, 2)}}),  # the window opens after this sample
        (2.0, {pid: {1: (800, 650, 8, 6), 2: (40, 0, 1, 0)}}),  # socket 2 opened inside: counted in full
        (3.0, {pid: {2: (90, 10, 2, 1)}}),  # socket 1 closed: its last sample stands
        (4.0, {pid: {2: (500, 10, 9, 1)}}),  # the first sample after the window closes it
        (5.0, {pid: {2: (9000, 10, 99, 1)}}),  # later traffic: not counted
    ]
    got = m.between(pid, 1.5, 3.5)
    assert got == {"bytes_sent": 500 + 500, "bytes_received": 500 + 10, "messages_sent": 5 + 9, "messages_received": 4 + 1}
    # the next phase starts at 3.8: the sample at 4.0 holds its traffic, so the one at 3.0 closes the window
    assert m.between(pid, 1.5, 3.5, limit=3.8) == {"bytes_sent": 500 + 90, "bytes_received": 500 + 10,
                                                   "messages_sent": 5 + 2, "messages_received": 4 + 1}
    assert m.between(pid, 9.0, 10.0) is None  # no sample inside: not metered, rather than zero
    assert m.between(8, 1.5, 3.5) == {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0, "messages_received": 0}

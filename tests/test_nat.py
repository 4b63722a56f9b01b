"""A peer behind NAT, in real network namespaces: a "public" bridge with a bootstrap and two peers on it, and
one peer in a private subnet behind a router namespace that masquerades it (nftables), as a home router does.

    10.77.0.0/24 "public"  (bridge br0 in namespace <p>pub)       192.168.77.0/24 "private"
      boot  10.77.0.1 ─┐                                           ┌─ router eth1 192.168.77.1
      ann   10.77.0.2 ─┼─ br0 ── router eth0 10.77.0.254 [nft masquerade] ── nat 192.168.77.2
      bob   10.77.0.3 ─┘

The public side has no route into 192.168.77.0/24: nobody can dial the NAT'd peer; it can only dial out,
and its connections arrive from 10.77.0.254. In the second case the router forwards nothing from the
private side at all (the swarm's ports are blocked): the NAT'd peer reaches only the shared folder, a host
directory every namespace sees (namespaces separate networks, not file systems).

Every namespace is created by the test and deleted at the end, with every process (killed by PID with its
p2pd; a namespace's deletion also removes its veths). Needs root and `ip` (and `nft`: CI installs it in
.ci/run); elsewhere the module is skipped with one line saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from helpers import (ENDLESS, HANG, HM_EXP, PROCESS_TEST_TIMEOUT, by_name, events, kill_tree, metrics, node_cmd, sets,
                     wait_until)

EXP = HM_EXP
PUBLIC = "10.77.0"
PRIVATE = "192.168.77"
ROUTER_PUBLIC = f"{PUBLIC}.254"
ROUNDS_SEEN = 3  # rounds every peer must play (and exchange in) before the test stops them


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on this machine (.ci/run installs iproute2 and nftables on Debian)"
    # What the test builds, in miniature: a namespace, a bridge and a veth in it, an nftables NAT table.
    probe = f"p2nprobe{os.getpid()}"
    steps = [["ip", "netns", "add", probe],
             ["ip", "netns", "exec", probe, "ip", "link", "add", "br0", "type", "bridge"],
             ["ip", "netns", "exec", probe, "ip", "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"],
             ["ip", "netns", "exec", probe, "nft", "add", "table", "ip", "nat"]]
    try:
        for step in steps:
            got = subprocess.run(step, capture_output=True, text=True, timeout=30)
            if got.returncode != 0:
                return f"this machine forbids what the test needs (`{' '.join(step[-4:])}`: {got.stderr.strip()[:200]})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_WHY = _why_no_namespaces()
pytestmark = [pytest.mark.timeout(PROCESS_TEST_TIMEOUT), pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]


def sh(*cmd: str, ns: str | None = None, input: str | None = None) -> str:
    """Run one command (inside namespace `ns`); its stdout, or AssertionError with its stderr."""
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    got = subprocess.run(full, capture_output=True, text=True, input=input, timeout=60)
    assert got.returncode == 0, f"{' '.join(full)}: {got.stderr.strip()}"
    return got.stdout


NS_PREFIX = "p2n"


def _delete_orphans() -> None:
    """Namespaces left by a test run that was itself killed (its pid, in the name, is gone)."""
    for ns in sh("ip", "netns", "list").split():
        digits = ns[len(NS_PREFIX):].split("x", 1)[0]
        if ns.startswith(NS_PREFIX) and "x" in ns and digits.isdigit() and not os.path.exists(f"/proc/{digits}"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Net:
    """The namespaces of one test, all named `<prefix><name>`: `open()` makes the public bridge,
    `host(name, octet)` a host on it, `nat(name, forward)` a host behind a masquerading router of its own;
    `ips[name]` is a host's address and `run(name, cmd)` the command line that runs `cmd` inside its
    namespace. `close()` deletes every namespace made (their veths go with them), whatever failed before."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.made: list[str] = []
        self.ips: dict[str, str] = {}
        self.bridge = ""

    def open(self) -> Net:
        _delete_orphans()
        self.bridge = self._ns("pub")
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.bridge)
        sh("ip", "link", "set", "br0", "up", ns=self.bridge)
        return self

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}{name}"
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        return ns

    def _plug(self, ns: str, ifname: str, port: str, cidr: str) -> None:
        """A veth from `ns` (named `ifname`, address `cidr`) to the public bridge (its end named `port`)."""
        sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge)
        sh("ip", "link", "set", port, "master", "br0", "up", ns=self.bridge)
        sh("ip", "addr", "add", cidr, "dev", ifname, ns=ns)
        sh("ip", "link", "set", ifname, "up", ns=ns)

    def host(self, name: str, octet: int) -> str:
        ns = self._ns(name)
        self._plug(ns, "eth0", f"v{name}"[:15], f"{PUBLIC}.{octet}/24")
        self.ips[name] = f"{PUBLIC}.{octet}"
        return self.ips[name]

    def nat(self, name: str, forward: bool, router_octet: int = 254) -> str:
        """`name` behind a masquerading router of its own (public address .`router_octet`, the private
        subnet the same behind every router, as at home); `forward=False`: the router forwards nothing it sends."""
        router, ns = self._ns(f"r{name}"), self._ns(name)
        self._plug(router, "eth0", f"vr{name}"[:15], f"{PUBLIC}.{router_octet}/24")
        sh("ip", "link", "add", "eth1", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{PRIVATE}.1/24", "dev", "eth1", ns=router)
        sh("ip", "link", "set", "eth1", "up", ns=router)
        sh("ip", "addr", "add", f"{PRIVATE}.2/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "route", "add", "default", "via", f"{PRIVATE}.1", ns=ns)
        # Per namespace (/proc/sys/net is the reader's namespace's): the host's forwarding stays as it is.
        sh("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward", ns=router)
        # A home router: replies to what the inside opened pass, nothing new comes in; out goes masqueraded.
        sh("nft", "-f", "-", ns=router, input=f"""
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" masquerade
    }}
}}
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {'iifname "eth1" oifname "eth0" accept' if forward else ''}
    }}
}}
""")
        self.ips[name] = f"{PRIVATE}.2"
        return self.ips[name]

    def run(self, name: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}{name}", *cmd]

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()


@pytest.fixture
def net(procs):
    """Namespaces for one test; deleted after its processes are killed (procs is torn down after this)."""
    n = Net(f"{NS_PREFIX}{os.getpid()}x")
    try:
        yield n.open()
    finally:
        procs.kill_all()  # first the processes (and their p2pd), then the namespaces they ran in
        n.close()
        assert not [ns for ns in sh("ip", "netns", "list").split() if ns.startswith(n.prefix)]


def connect_from(net: Net, client: str, server: str, port: int = 38999) -> str:
    """The source address `server` sees when `client` opens a TCP connection to it ("" if it cannot)."""
    ip = net.ips[server]
    code = ("import socket,sys; s=socket.create_server(('%s',%d)); s.settimeout(10); print('ready',flush=True);"
            "c,a=s.accept(); print(a[0],flush=True)") % (ip, port)
    srv = subprocess.Popen(net.run(server, [sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        dial = subprocess.run(net.run(client, [sys.executable, "-c",
                                               f"import socket; socket.create_connection(('{ip}',{port}),timeout=3)"]),
                              capture_output=True, timeout=30)
        return srv.stdout.readline().strip() if dial.returncode == 0 else ""
    finally:
        kill_tree(srv)


def start_boot(procs, net: Net) -> str:
    procs.start("boot", net.run("boot", [sys.executable, "-m", "bootstrap", "--host", net.ips["boot"], "--port", "0",
                                         "--identity", "boot.key", "--experiment", EXP, "--status-every", "2",
                                         "--coordinator"]))
    return procs.wait_for("boot", rf"^(/ip4/{net.ips['boot']}/tcp/\d+/p2p/\w+)$", HANG).group(1)


def peer(tmp, net: Net, name: str, *extra: str) -> list[str]:
    (tmp / "drive").mkdir(exist_ok=True)
    return net.run(name, node_cmd(tmp / "runs" / name, name, ENDLESS, "--host", net.ips[name],
                                  "--drive-path", str(tmp / "drive"), *extra))


def play(procs, tmp, names: list[str]) -> dict[str, list[dict]]:
    """Wait until each named node played ROUNDS_SEEN rounds; then kill them all and return those rows."""
    wait_until(lambda: all(len(metrics(tmp, n)) >= ROUNDS_SEEN for n in names), HANG,
               f"{ROUNDS_SEEN} rounds played by each",
               lambda: "".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in names))
    for n in names:
        kill_tree(procs[n])
    return {n: metrics(tmp, n)[:ROUNDS_SEEN] for n in names}


@pytest.mark.slow
def test_peer_behind_nat_exchanges_with_public_peers_every_round(procs, net, tmp_path):
    for i, n in enumerate(("boot", "ann", "bob"), start=1):
        net.host(n, i)
    net.nat("cat", forward=True)
    # The NAT is real: cat's connections arrive from the router's address, and nobody can dial cat.
    assert connect_from(net, "cat", "ann") == ROUTER_PUBLIC
    assert connect_from(net, "ann", "cat") == ""
    boot = start_boot(procs, net)
    names = ["ann", "bob", "cat"]
    for n in names:  # each waits for both others' batches every round
        procs.start(n, peer(tmp_path, net, n, "--initial-peers", boot, *sets("collect_peers=2", "collect_timeout=240"),
                            *(["--client-mode"] if n == "cat" else [])))
    played = play(procs, tmp_path, names)
    ids = {n: procs.peer_id(n) for n in names}
    for n in names:
        rows = played[n]
        assert [r["round"] for r in rows] == list(range(ROUNDS_SEEN)), (n, procs.log(n)[-2000:])
        # Every round, 4 groups from each of the two others: the NAT'd peer's reach both public peers and theirs reach it.
        assert [r["swarm_groups_received"] for r in rows] == [2 * 4] * ROUNDS_SEEN, (n, rows)
        per_peer = rows[-1]["comm"]["per_peer"]
        for m in names:
            if m != n:
                assert per_peer[ids[m]]["groups"] >= ROUNDS_SEEN * 4, (n, m, per_peer)


@pytest.mark.slow
def test_peer_that_reaches_nothing_of_the_swarm_learns_through_the_drive_bridge(procs, net, tmp_path):
    for i, n in enumerate(("boot", "ann", "bridge"), start=1):
        net.host(n, i)
    net.nat("cat", forward=False)
    assert connect_from(net, "cat", "ann") == ""  # the router forwards nothing from the inside
    boot = start_boot(procs, net)
    # All three start at once (each waits for what it should get, however slowly the others start). cat tries
    # the DHT, cannot reach it, and runs on the shared folder, waiting for two batches a round: the bridge's
    # own and ann's, relayed by the bridge. ann waits for the bridge's and cat's (relayed); the bridge for one
    # on each side.
    procs.start("cat", peer(tmp_path, net, "cat", "--comm", "auto", "--initial-peers", boot,
                            *sets("collect_peers=2", "collect_timeout=240", "drive_poll_interval=0.2")))
    procs.start("ann", peer(tmp_path, net, "ann", "--comm", "hivemind", "--initial-peers", boot,
                            *sets("collect_peers=2", "collect_timeout=240")))
    procs.start("bridge", peer(tmp_path, net, "bridge", "--comm", "hybrid", "--initial-peers", boot,
                               *sets("collect_peers=1", "collect_timeout=240", "drive_poll_interval=0.2")))
    procs.wait_for("cat", r"the DHT is out of reach .*running in Drive mode", HANG)
    names = ["ann", "bridge", "cat"]
    played = play(procs, tmp_path, names)
    ids = {n: procs.peer_id(n) for n in names}
    # cat learned from both public peers every round: the bridge's batch and ann's, relayed with ann's signature.
    assert [r["swarm_groups_received"] for r in played["cat"]] == [2 * 4] * ROUNDS_SEEN, played["cat"]
    senders = {p for e in events(tmp_path, "cat") if e.get("kind") == "rollouts_received" for p in e.get("peers", [])}
    assert {ids["ann"], ids["bridge"]} <= senders, senders
    # ... and its own batches reached ann on the DHT side, relayed by the bridge.
    assert [r["swarm_groups_received"] for r in played["ann"]] == [2 * 4] * ROUNDS_SEEN, played["ann"]
    relayed = played["ann"][-1]["comm"]["per_peer"][ids["cat"]]
    assert relayed["groups"] >= ROUNDS_SEEN * 4 and relayed["relayed"] >= 1, relayed
    assert by_name(played["ann"][-1]["comm"]["per_peer"])["bridge"]["groups"] >= ROUNDS_SEEN * 4


def _inline_batches() -> bool:
    """Whether client-mode peers send their batches on the gossip topic itself (the `gossip_inline` setting):
    the only path between two peers behind different NATs, since neither can dial the other."""
    from p2pswarm.settings import Settings

    return "gossip_inline" in Settings.model_fields


@pytest.mark.slow
@pytest.mark.skipif(not _inline_batches(), reason="two NAT'd peers need batches inline on the gossip topic; "
                                                   "this transport has no such path (docs/hivemind.md#behind-nat)")
def test_two_peers_behind_different_nats_exchange_every_round(procs, net, tmp_path):
    for i, n in enumerate(("boot", "ann"), start=1):
        net.host(n, i)
    net.nat("cat", forward=True, router_octet=254)
    net.nat("dog", forward=True, router_octet=253)  # its own router, the same private subnet behind it
    assert connect_from(net, "dog", "ann") == f"{PUBLIC}.253"
    boot = start_boot(procs, net)
    names = ["ann", "cat", "dog"]
    for n in names:
        procs.start(n, peer(tmp_path, net, n, "--initial-peers", boot, *sets("collect_peers=2", "collect_timeout=240"),
                            *(["--client-mode"] if n != "ann" else [])))
    played = play(procs, tmp_path, names)
    ids = {n: procs.peer_id(n) for n in names}
    for n in names:
        assert [r["swarm_groups_received"] for r in played[n]] == [2 * 4] * ROUNDS_SEEN, (n, played[n])
        per_peer = played[n][-1]["comm"]["per_peer"]
        assert all(per_peer[ids[m]]["groups"] >= ROUNDS_SEEN * 4 for m in names if m != n), (n, per_peer)

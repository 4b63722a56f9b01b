"""The swarm's GossipSub topic, on real p2pd daemons (four hivemind peers in this process): our pubsub binding,
membership, the clock, the exchange (pulls, a batch inline from a client-mode peer, catch-up), per-author caps
and bad messages; and the pure rules the exchange runs on (which announcers to sample, when a round is over)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import msgpack
import pytest

from helpers import wait_until
from p2pswarm.comm.core import Progress, collect_need, sample_sources, should_advance
from p2pswarm.comm.hivemind import gossip, pubsub
from p2pswarm.identity import Identity
from p2pswarm.types import Group, Task

SWARM = "gossip-test"
ALICE = "12D3KooWDuNT286T2BriA2crTWPNhqiiFdFFnRLJVvjJ2jVUZfr1"  # a valid Ed25519 peer id
WAIT = 60  # a hang: the mesh forms within a few heartbeats (1 s each) even on a busy machine


def groups(peer: str) -> list[Group]:
    return [Group(Task("x", "basic_arithmetic", "What is 1+1?", "2"), ["<answer>2</answer>"] * 4, peer, [1.0, 0.0, 1.0, 0.0])]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """keeper (starts the swarm, keeps the clock), ann, cat (client mode), and mallory, each a HivemindNode
    with its own p2pd and a HivemindComm on the swarm's topic; all closed at the end."""
    from p2pswarm.comm.hivemind.coordinator import DHTCoordinator, RoundKeeper
    from p2pswarm.comm.hivemind.manager import HivemindComm
    from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig

    d = tmp_path_factory.mktemp("gossip")
    comms: dict[str, HivemindComm] = {}
    keeper = None
    try:
        for name in ("keeper", "ann", "cat", "mallory"):
            ident = Identity.load_or_create(d / f"{name}.key")
            while name in ("cat", "mallory") and gossip.shard_of(ident.peer_id, 2) == gossip.shard_of(comms["ann"].peer_id, 2):
                (d / f"{name}.key").unlink()  # in the other shard of two than ann (test_topic_shards...)
                ident = Identity.load_or_create(d / f"{name}.key")
            boot = [] if name == "keeper" else comms["keeper"].node.maddrs
            node = HivemindNode(ident, d / f"{name}.key", NetConfig(host="127.0.0.1", initial_peers=boot,
                                                                    client_mode=name == "cat")).start()
            role = "trainer" if name in ("ann", "cat") else "bootstrap"  # collects wait for the two trainers only
            comms[name] = HivemindComm(node, SWARM, name=name, role=role, timeout=8.0, seed=1)
            if name == "keeper":
                keeper = RoundKeeper(comms["keeper"], None, fraction=0.75, log_rounds=False)
        clocks = {n: DHTCoordinator(c, trusted={comms["keeper"].peer_id}) for n, c in comms.items() if n != "keeper"}
        yield comms, keeper, clocks
    finally:
        if keeper is not None:
            keeper.close()
        for c in reversed(list(comms.values())):
            c.close()


def members_of(comm) -> set[str]:
    return {m.name for m in comm.node.call(comm.fetch_members(), timeout=10).values()}


def test_pubsub_binding_publishes_subscribes_and_verifies_authors(swarm):
    comms, _, _ = swarm
    ann, cat = comms["ann"], comms["cat"]
    # The daemon runs with -pubsub (the P2P subclass's arguments): it lists our subscription.
    assert ann.topic in ann.node.call(pubsub.topics(ann.node.p2p), timeout=10)
    wait_until(lambda: ann.node.call(pubsub.topic_peers(ann.node.p2p, ann.topic), timeout=10), WAIT, "a topic peer")
    got = []

    async def keep(msg):
        got.append(msg)

    keeper = comms["keeper"]  # cat's initial peer: connected to it whatever NAT cat is behind
    sub = cat.node.call(pubsub.Subscription(cat.node.p2p, "raw-topic", keep).start(), timeout=10)
    try:
        wait_until(lambda: cat.peer_id in keeper.node.call(pubsub.topic_peers(keeper.node.p2p, "raw-topic"), timeout=10),
                   WAIT, "cat's subscription known to the keeper")
        keeper.node.call(pubsub.publish(keeper.node.p2p, "raw-topic", b"hello"), timeout=10)
        wait_until(lambda: any(m.data == b"hello" for m in got), WAIT, "the message at cat")
    finally:
        cat.node.loop.call_soon_threadsafe(sub.close)
    msg = next(m for m in got if m.data == b"hello")
    # The author is the publisher's peer id, and its signature holds; any change to the message breaks it.
    assert pubsub.verify_message(msg) == keeper.peer_id
    msg.data = b"hellO"
    assert pubsub.verify_message(msg) is None


def test_membership_and_the_clock_come_over_the_topic(swarm):
    comms, keeper, clocks = swarm
    everyone = {"keeper", "ann", "cat", "mallory"}
    wait_until(lambda: all(members_of(c) == everyone for c in comms.values()), WAIT, "every member heard by all",
               lambda: str({n: members_of(c) for n, c in comms.items()}))
    wait_until(lambda: all(c.current() == keeper.round for c in clocks.values()), WAIT, "the keeper's clock at every peer")
    # A clock from anyone but the trusted keeper is not followed, however high.
    mallory = comms["mallory"]
    mallory.node.call(mallory._publish(gossip.clock(10**6, time.time())), timeout=10)
    wait_until(lambda: comms["ann"].book.clocks.get(mallory.peer_id), WAIT, "mallory's clock message heard")
    assert clocks["ann"].current() == keeper.round < 10**6


def test_exchange_pulls_and_inline_batches_and_catch_up(swarm):
    comms, _, _ = swarm
    ann, cat, keeper = comms["ann"], comms["cat"], comms["keeper"]
    wait_until(lambda: {"ann", "cat"} <= members_of(keeper) and {"cat"} <= members_of(ann), WAIT, "members")
    ann.publish(5, 0, groups(ann.peer_id))
    cat.publish(5, 0, groups(cat.peer_id))  # client mode: its batch travels on the topic itself
    got = ann.collect(5, 0)
    assert [g.peer for g in got] == [cat.peer_id]
    got = cat.collect(5, 0)
    assert [g.peer for g in got] == [ann.peer_id]
    assert cat.per_peer[ann.peer_id]["pulled_bytes"] > 0 and ann.per_peer[cat.peer_id].get("pulled_bytes", 0) == 0
    # cat's announcement is its heartbeat too, but one that carries its batch is not handed on as one.
    assert ann.book.members[cat.peer_id].round == 5
    raw = ann.book.raw_heartbeats.get(cat.peer_id)
    assert raw is None or not getattr(gossip.parse(cat.peer_id, bytes(raw.data))[1], "data", b"")
    # The keeper forgets what it heard of round 5, as a peer that joined late never heard it; its collect then
    # asks peers what they heard (catch-up) and still gets both batches.
    keeper.node.call(_forget(keeper, 5), timeout=10)
    before = keeper.catchups
    got = keeper.collect(5, 0)
    assert sorted(g.peer for g in got) == sorted([ann.peer_id, cat.peer_id])
    assert keeper.catchups == before + 1


def test_a_collect_still_short_asks_again(swarm):
    """A lost announcement that no heartbeat mentions (its author's position came with it, or it was a
    bridge's relay) and a first catch-up that misses it too: a collect still short of its batches asks again
    after a pause, and gets it well before its deadline."""
    from hivemind.p2p import PeerID

    comms, _, _ = swarm
    ann, cat, keeper = comms["ann"], comms["cat"], comms["keeper"]
    wait_until(lambda: {"ann", "cat"} <= members_of(keeper), WAIT, "members")
    cat_id, first, handle = PeerID.from_base58(cat.peer_id).to_bytes(), keeper.catchups, keeper.book.handle

    def lossy(msg, via=None):  # cat's announcement of round 7 is lost on the topic and in the first catch-up
        if bytes(getattr(msg, "from")) == cat_id and keeper.catchups < first + 2:
            v = msgpack.unpackb(bytes(msg.data), raw=False)
            if isinstance(v, dict) and v.get("k") == "a" and v.get("round") == 7:
                return None
        return handle(msg, via=via)

    keeper.book.handle, keeper.timeout = lossy, 60.0
    try:
        ann.publish(7, 0, groups(ann.peer_id))
        cat.publish(7, 0, groups(cat.peer_id))
        t0 = time.monotonic()
        got = keeper.collect(7, 0)
    finally:
        keeper.book.handle, keeper.timeout = handle, 8.0
    assert sorted(g.peer for g in got) == sorted([ann.peer_id, cat.peer_id])
    assert keeper.catchups >= first + 2 and time.monotonic() - t0 < 60


def test_a_peer_at_its_last_round_serves_it_while_another_still_plays_it(swarm):
    """ann stops after round 9 while cat still plays it: serve_last_round holds (ann's batch is pulled from
    ann) until cat reports round 9 finished; it returns at once for a round nobody plays and on a stop."""
    comms, _, _ = swarm
    ann, cat = comms["ann"], comms["cat"]
    wait_until(lambda: {"cat"} <= members_of(ann), WAIT, "members")
    ann.publish(9, 0, groups(ann.peer_id))
    ann.set_position(finished=9)
    cat.publish(9, 0, groups(cat.peer_id))  # cat's announcement says it plays round 9
    wait_until(lambda: ann.node.call(ann.fetch_members(), timeout=10)[cat.peer_id].round == 9, WAIT, "cat at 9")
    stop, timeout = threading.Event(), ann.timeout
    ann.timeout = 600.0  # the bound is collect_timeout: here only cat's report ends the wait
    try:
        serving = threading.Thread(target=ann.serve_last_round, args=(9, stop), daemon=True)
        serving.start()
        assert [g.peer for g in cat.collect(9, 0)] == [ann.peer_id]  # pulled from ann
        assert serving.is_alive()  # cat has not said it finished round 9
        cat.set_position(finished=9)
        serving.join(WAIT)
        assert not serving.is_alive()
        ann.serve_last_round(30, stop)  # nobody plays round 30 or is about to: returns at once
        stop.set()
        cat.set_position(round=31)  # playing 31 now, unfinished: only the stop request ends the wait
        ann.serve_last_round(31, stop)
    finally:
        stop.set()
        ann.timeout = timeout


def test_an_announcement_is_the_heartbeat_and_an_idle_peer_still_beats(swarm):
    """The cadence that keeps a peer's topic traffic small: a peer that announces sends no separate heartbeat
    (its announcement carries the fields, and keeps it live with its new position at the others), a new
    finished round goes out at once (the keeper's quorum waits on it), and a peer that publishes nothing
    still heartbeats every MEMBER_REFRESH."""
    comms, _, _ = swarm
    ann, cat, keeper = comms["ann"], comms["cat"], comms["keeper"]
    wait_until(lambda: "ann" in members_of(cat), WAIT, "ann heard by cat")
    beats = ann.heartbeats
    last, gaps = time.monotonic(), []
    for r in range(20, 26):  # an announcement about every second, each a new position
        ann.publish(r, 0, groups(ann.peer_id))
        gaps.append(time.monotonic() - last)
        last = time.monotonic()
        time.sleep(1.0)
    if max(gaps) < gossip.MEMBER_REFRESH - 1:  # else the machine stalled a whole period: a heartbeat was due
        assert ann.heartbeats == beats
    # cat knows ann's position from the announcement alone, and keeps it live from it.
    wait_until(lambda: (m := cat.book.members.get(ann.peer_id)) is not None and m.round == 25, WAIT,
               "ann's position from its announcement")
    seen = cat.book.members[ann.peer_id]
    assert "ann" in members_of(cat) and seen.expires >= seen.time + gossip.MEMBER_TTL - 1e-6
    kind, _ = gossip.parse(ann.peer_id, bytes(cat.book.raw_heartbeats[ann.peer_id].data))
    assert kind == "a"  # what cat hands a late joiner for ann is that announcement
    # A new finished round is said at once; the same one again is not.
    beats = ann.heartbeats
    ann.set_position(finished=25)
    assert ann.heartbeats == beats + 1
    ann.set_position(finished=25)
    if ann._quiet_for() < gossip.MEMBER_REFRESH:
        assert ann.heartbeats == beats + 1
    wait_until(lambda: cat.book.members[ann.peer_id].finished == 25, WAIT, "ann's finished round at cat")
    # The keeper publishes clocks only (no announcement): it still heartbeats, and stays a member.
    idle = keeper.heartbeats
    wait_until(lambda: keeper.heartbeats > idle, WAIT, "a heartbeat from the idle keeper")
    assert "keeper" in members_of(cat)


def test_topic_shards_follow_the_keepers_clock(swarm):
    """Past gossip_shard_size trainers the keeper splits the topic: each peer announces and listens in its
    own shard (fixed by its id), so what it hears no longer grows with the swarm; the keeper listens to all
    of them for its quorum, and peers move back when the swarm shrinks."""
    from p2pswarm.comm.hivemind.coordinator import RESHARD_EVERY

    comms, keeper_clock, clocks = swarm
    ann, cat, keeper = comms["ann"], comms["cat"], comms["keeper"]
    wait_until(lambda: {"ann", "cat"} <= members_of(keeper), WAIT, "members")

    def follow(shards):
        keeper_clock._resharded = float("-inf")  # the test does not wait out RESHARD_EVERY
        wait_until(lambda: keeper_clock.shards == shards, WAIT, f"the keeper at {shards} shard(s)")
        wait_until(lambda: [clocks[n].current() is not None and comms[n].shards for n in ("ann", "cat")] == [shards] * 2,
                   WAIT, f"ann and cat following {shards} shard(s)")

    assert RESHARD_EVERY >= gossip.MEMBER_TTL
    keeper_clock.shard_size = 1  # two trainers, at most one a shard: two shards
    try:
        follow(2)
        assert ann.shard != cat.shard and ann.shard_topic != cat.shard_topic != ann.topic
        assert keeper.all_shards and {gossip.topic(ann.swarm, 2, i) for i in (0, 1)} <= keeper.subscriptions.keys()
        # Each announces in its own shard: the keeper hears both, neither hears the other, and neither waits for
        # the other (it is not expected in its collect).
        ann.publish(30, 0, groups(ann.peer_id))
        cat.publish(30, 0, groups(cat.peer_id))
        wait_until(lambda: {a.peer_id for a in keeper.book.announcements(30, 0)} == {ann.peer_id, cat.peer_id}, WAIT,
                   "both announcements at the keeper")
        t0 = time.monotonic()
        assert ann.collect(30, 0) == [] and time.monotonic() - t0 < ann.timeout
        assert cat.peer_id not in ann.live_peers() and ann.peer_id not in cat.live_peers()
        assert {a.peer_id for a in ann.book.announcements(30, 0)} <= {ann.peer_id}
        assert ann.counters()["gossip_shards"] == 2
        # A peer speaking in a shard that is not its own is refused there and counted (nobody picks its crowd).
        mallory, before = comms["mallory"], ann.book.drops["gossip_wrong_shard"]
        beat = gossip.heartbeat(name="m", role="trainer", round=30, stage=0, finished=29)
        mallory.node.call(mallory._publish(beat, topic=ann.shard_topic), timeout=10)
        wait_until(lambda: ann.book.drops["gossip_wrong_shard"] > before, WAIT, "mallory refused in ann's shard")
        assert mallory.peer_id not in ann.live_peers() and ann.per_peer[mallory.peer_id]["dropped_gossip_wrong_shard"] >= 1
    finally:
        keeper_clock.shard_size = 0  # back to one topic: everyone hears everyone again
        follow(1)
    ann.publish(31, 0, groups(ann.peer_id))
    cat.publish(31, 0, groups(cat.peer_id))
    assert [g.peer for g in ann.collect(31, 0)] == [cat.peer_id]


def test_relays_beyond_what_their_author_bridges_are_refused_as_they_come(swarm):
    """A peer relaying more origins than its heartbeat says it bridges is relaying invented identities: the
    excess is refused and counted on arrival, whether or not a collect of that slot is running, so it neither
    fills the book nor crowds the catch-up replies that hand on a random sample of a slot's announcements."""
    comms, _, _ = swarm
    ann, mallory = comms["ann"], comms["mallory"]
    wait_until(lambda: mallory.peer_id in ann.book.members, WAIT, "mallory known to ann")
    assert ann.book.members[mallory.peer_id].bridged == 0 and ann.book.relay_cap(mallory.peer_id) == 1
    before = ann.book.drops["gossip_relay_limit"]
    for _ in range(3):
        origin = Identity.generate().peer_id
        mallory.node.call(mallory._publish(gossip.announcement(40, 0, os.urandom(32), 1000, origin=origin)), timeout=10)
    wait_until(lambda: ann.book.drops["gossip_relay_limit"] >= before + 2, WAIT, "two of three relays refused at ann")
    assert [a.peer_id for a in ann.book.announcements(40, 0)] == [mallory.peer_id]
    assert ann.per_peer[mallory.peer_id]["dropped_gossip_relay_limit"] == 2


def test_heartbeat_fields_in_an_announcement_are_checked_and_old_formats_still_parse():
    peer = ALICE
    me = {"name": "ann", "role": "trainer", "round": 3, "stage": 1, "finished": 2, "bridged": 0, "paused": True}
    kind, a = gossip.parse(peer, gossip.announcement(3, 1, b"\x01" * 32, 100, member=me))
    assert kind == "a" and (a.member.round, a.member.stage, a.member.finished, a.member.paused) == (3, 1, 2, True)
    # A relay speaks for another peer's batch, never for its author's position.
    relay = gossip.announcement(3, 1, b"\x01" * 32, 100, origin=ALICE, member=me)
    assert "role" not in msgpack.unpackb(relay) and gossip.parse(peer, relay)[1].member is None
    # Older peers: an announcement without the fields, and a heartbeat with every field written out.
    old = {"k": "a", "round": 3, "stage": 1, "digest": b"\x01" * 32, "size": 100, "created": time.time()}
    assert gossip.parse(peer, msgpack.packb(old))[1].member is None
    full = {"k": "h", "name": "ann", "role": "trainer", "round": 3, "stage": 1, "finished": 2, "time": time.time(),
            "left": False, "bridged": 0, "paused": False}
    assert gossip.parse(peer, msgpack.packb(full))[0] == "h"
    # Carried fields are held to the heartbeat's limits: a bad one makes the message malformed.
    with pytest.raises(gossip.V.Invalid):
        gossip.parse(peer, msgpack.packb({**old, "name": "\x1b[2J", "role": "trainer", "finished": 2}))
    with pytest.raises(gossip.V.Invalid):
        gossip.parse(peer, msgpack.packb({**old, "name": "ann", "role": "trainer", "finished": float("inf")}))
    # An old announcement handed on again keeps its batch but says nothing about its author now.
    stale = gossip.announcement(3, 1, b"\x01" * 32, 100, member=me)
    assert gossip.parse(peer, stale, now=time.time() + 2 * gossip.MEMBER_TTL)[1].member is None


async def _forget(comm, round):
    comm.book.announced = {k: v for k, v in comm.book.announced.items() if k[0] != round}
    comm.book.slots_by.clear()
    comm.book._seen.clear()


def test_bad_and_excess_messages_are_dropped_counted_and_struck(swarm):
    comms, _, _ = swarm
    ann, mallory = comms["ann"], comms["mallory"]
    ann.set_ban_policy(3, 30.0)
    junk = [b"\x00junk", msgpack.packb([1, 2]), msgpack.packb({"k": "zz"}),
            msgpack.packb({"k": "h", "name": "\x1b[2J", "role": "trainer", "round": 0, "stage": 0, "finished": -1,
                           "time": time.time()}),
            msgpack.packb({"k": "a", "round": 0, "stage": 0, "digest": b"\x00" * 32, "size": 10, "created": time.time(),
                           "pad": b"\x00" * 5000}),  # over the 1 KB an announcement without its batch may take
            msgpack.packb({"k": "c", "round": 1, "started": float("nan")})]
    for j in junk:
        mallory.node.call(mallory._publish(j), timeout=10)
    for _ in range(150):  # past the rate any author may send
        mallory.node.call(mallory._publish(gossip.clock(1, time.time())), timeout=10)
    row = lambda: ann.per_peer[mallory.peer_id]  # noqa: E731
    wait_until(lambda: row().get("dropped_gossip_over_rate", 0) > 0 and row().get("dropped_gossip_too_large", 0) > 0
               and row().get("dropped_gossip_malformed", 0) >= 4, WAIT, "every kind counted at ann", lambda: str(row()))
    counters = ann.counters()
    assert counters["dropped_gossip_over_rate"] > 0 and counters["dropped_gossip_malformed"] >= 4
    assert ann.ledger.banned(mallory.peer_id)  # strikes, like any invalid input
    assert "\x1b" not in str(ann.names.get(mallory.peer_id, ""))
    # A message whose author is not who signed it (handed over in a catch-up reply): refused, blamed on the
    # peer that handed it over, not on the peer it names.
    forged = pubsub.pb.PSMessage(data=gossip.clock(99, time.time()), seqno=os.urandom(8), topicIDs=[ann.topic])
    setattr(forged, "from", __import__("hivemind").p2p.PeerID.from_base58(comms["keeper"].peer_id).to_bytes())
    forged.signature = mallory.identity.sign(pubsub.SIGN_PREFIX + forged.SerializeToString())
    before = ann.book.drops["gossip_bad_signature"]
    assert ann.node.call(_handle(ann, forged, mallory.peer_id), timeout=10) is None
    assert ann.book.drops["gossip_bad_signature"] == before + 1
    assert ann.per_peer[mallory.peer_id]["dropped_gossip_bad_signature"] == 1
    assert ann.book.clocks.get(comms["keeper"].peer_id) is None or ann.book.clocks[comms["keeper"].peer_id].round != 99
    # A genuine message of another swarm's topic, handed over to replay it in this one: refused too.
    other = pubsub.pb.PSMessage(data=gossip.clock(98, time.time()), seqno=os.urandom(8), topicIDs=["p2pswarm/other/v1"])
    setattr(other, "from", __import__("hivemind").p2p.PeerID.from_base58(mallory.peer_id).to_bytes())
    other.signature = mallory.identity.sign(pubsub.SIGN_PREFIX + other.SerializeToString())
    assert pubsub.verify_message(other) == mallory.peer_id
    assert ann.node.call(_handle(ann, other, mallory.peer_id), timeout=10) is None
    assert ann.book.drops["gossip_wrong_topic"] == 1


async def _handle(comm, msg, via):
    return comm.book.handle(msg, via=via)


# ---- the rules, pure -------------------------------------------------------------------------------------------
def test_sample_sources_is_uniform_and_prefers_a_history():
    rng = random.Random(7)
    pool = [f"p{i:02d}" for i in range(20)]
    counts = Counter(p for _ in range(4000) for p in sample_sources(pool, 5, good=set(), rng=rng))
    assert set(counts) == set(pool)
    assert max(counts.values()) < 1.25 * min(counts.values())  # each about 4000 * 5 / 20 = 1000 times
    # Known-good peers first; fresh identities still get a quarter of the slots (rounded up), or more when
    # there are not enough good ones.
    good = set(pool[:10])
    sybils = [f"s{i:03d}" for i in range(500)]
    picked = sample_sources(pool + sybils, 8, good=good, rng=rng)
    assert len(picked) == 8 and sum(p in good for p in picked) == 6
    picked = sample_sources(pool[:3] + sybils, 8, good=good, rng=rng)
    assert sum(p in good for p in picked) == 3 and len(picked) == 8
    # No more than asked, no repeats; k <= 0 or a small pool: everyone.
    assert sorted(sample_sources(pool[:4], 8, good=set(), rng=rng)) == pool[:4]
    assert sorted(sample_sources(pool, 0, good=set(), rng=rng)) == pool
    assert len(set(sample_sources(pool + pool, 10, good=set(), rng=rng))) == 10


@pytest.mark.parametrize("want, live, bridged, failed, sample, need", [
    (0, 20, 0, 0, 8, 8),  # a sample of K: K valid batches end the collect
    (0, 20, 0, 5, 8, 8),  # failed pulls are replaced by fresh draws, so K are still wanted
    (0, 5, 0, 0, 8, 5),  # fewer expected than K: all of them
    (0, 5, 0, 2, 8, 3),
    (3, 20, 0, 0, 8, 3),  # collect_peers wins
    (0, 20, 0, 0, 0, 20),  # sample 0: everyone
])
def test_collect_need_with_a_sample(want, live, bridged, failed, sample, need):
    assert collect_need(want_peers=want, live=live, bridged=bridged, failed=failed, sample=sample) == need


def test_quorum_fraction_advances_without_the_slowest():
    now = 1000.0
    # 1000 trainers played the last round; 750 finished this one: over with 0.75, not with 1.0.
    trainers = {f"p{i}": Progress(round=5, finished=5 if i < 750 else 4) for i in range(1000)}
    assert should_advance(5, trainers, quorum=0, deadline=300, first_done_at=now, now=now, fraction=0.75)
    assert not should_advance(5, trainers, quorum=0, deadline=300, first_done_at=now, now=now, fraction=1.0)
    trainers["p750"] = Progress(5, 4)
    almost = {p: Progress(5, 5 if i < 749 else 4) for i, p in enumerate(trainers)}
    assert not should_advance(5, almost, quorum=0, deadline=300, first_done_at=now, now=now, fraction=0.75)
    # ... or at the deadline whatever the fraction; and small swarms still wait for everyone (ceil(0.75 * 3) = 3).
    assert should_advance(5, almost, quorum=0, deadline=300, first_done_at=now - 300, now=now, fraction=0.75)
    three = {"a": Progress(5, 5), "b": Progress(5, 5), "c": Progress(5, 4)}
    assert not should_advance(5, three, quorum=0, deadline=300, first_done_at=now, now=now, fraction=0.75)
    # Trainers that did not play the last round (gone, or only pretending) are not counted at all.
    idle = {**{f"q{i}": Progress(1, 1) for i in range(100)}, "a": Progress(5, 5), "b": Progress(5, 5)}
    assert should_advance(5, idle, quorum=0, deadline=300, first_done_at=now, now=now, fraction=0.75)


def test_shard_rules():
    # As many shards as keep each at most shard_size trainers, in powers of two; fewer only once the shards
    # would be at most a quarter full (no moving peers back and forth at a boundary); 0: one topic.
    assert [gossip.shards_for(n, 32) for n in (0, 32, 33, 64, 65, 1000)] == [1, 1, 2, 2, 4, 32]
    assert gossip.shards_for(40, 32, now=4) == 4 and gossip.shards_for(33, 32, now=4) == 4
    assert gossip.shards_for(32, 32, now=4) == 1 and gossip.shards_for(17, 32, now=2) == 2
    assert gossip.shards_for(10**9, 32) == gossip.MAX_SHARDS and gossip.shards_for(500, 0, now=8) == 1
    # A peer's shard is fixed by its id, and ids spread evenly over the shards.
    ids = [Identity.generate().peer_id for _ in range(4000)]
    counts = Counter(gossip.shard_of(p, 8) for p in ids)
    assert set(counts) == set(range(8)) and max(counts.values()) < 1.25 * min(counts.values())
    assert all(gossip.shard_of(p, 8) == gossip.shard_of(p, 8) for p in ids[:10]) and gossip.shard_of(ids[0], 1) == 0
    # The swarm's topics: the base and its shards' (nothing else, no other swarm's, no odd spelling).
    base = gossip.topic("s")
    assert gossip.topic("s", 1, 0) == base and gossip.topic("s", 4, 3) == base + "/s4.3"
    assert all(gossip.is_swarm_topic(t, base) for t in (base, base + "/s4.3", base + "/s4096.0"))
    assert not any(gossip.is_swarm_topic(t, base) for t in (
        base + "/s4.4", base + "/s1.0", base + "/s04.1", base + "/s4.1/x", base + "/s8192.1", gossip.topic("t", 4, 1),
        base + "/s4.-1", base + "/s", base + "x", "", base + "/s4.1 "))


def test_a_keeper_persists_its_round_and_shards(tmp_path):
    """A restarted keeper resumes its round and its topic shards (else its first clock would move the whole
    swarm back to one topic); anything odd in the file resumes nothing it cannot trust."""
    from p2pswarm.comm.hivemind.coordinator import read_state, write_round

    p = tmp_path / "round_clock.json"
    assert read_state(p) == (None, 1)
    write_round(p, 7, 1.0, 4)
    assert read_state(p) == (7, 4)
    for bad in ('{"round": 7, "shards": 0}', '{"round": 7, "shards": true}', '{"round": 7, "shards": 99999}',
                '{"round": 7}', '{"round": 7, "shards": 2.0}'):
        p.write_text(bad)
        assert read_state(p) == (7, 1), bad
    for bad in ('{"round": true}', "junk", "[]", '{"round": 1.5}'):
        p.write_text(bad)
        assert read_state(p) == (None, 1), bad

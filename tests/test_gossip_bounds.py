"""What the swarm's topic and its streams may cost a node, however many identities speak: the Book (gossip.py)
fed real signed messages (each from its own Ed25519 identity, as the daemon delivers them), the catch-up
reply's decoder, the subscription's queue, and the payload and catch-up stream servers (real p2pd daemons for
a puller that never reads). Every bound is checked by counts and bytes, never by durations."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import tracemalloc

import msgpack
import pytest

from helpers import wait_until
from p2pswarm.comm.hivemind import gossip, payloads, pubsub
from p2pswarm.identity import Identity

SWARM = "bounds-test"
TOPIC = gossip.topic(SWARM)


def signed(ident: Identity, data: bytes, topic: str = TOPIC) -> pubsub.pb.PSMessage:
    """A topic message authored and signed by `ident`, as p2pd hands it over (StrictSign)."""
    from hivemind.p2p import PeerID

    msg = pubsub.pb.PSMessage(data=data, seqno=os.urandom(8), topicIDs=[topic])
    setattr(msg, "from", PeerID.from_base58(ident.peer_id).to_bytes())
    msg.signature = ident.sign(pubsub.SIGN_PREFIX + msg.SerializeToString())
    return msg


class Ticks:
    """A monotonic clock for the Book's rate buckets: `step` seconds a reading (0: never refills)."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def member(name: str = "t", finished: int = -1) -> dict:
    return {"name": name, "role": "trainer", "finished": finished}


def announce(ident: Identity, round: int, stage: int, data: bytes = b"", **kw) -> pubsub.pb.PSMessage:
    digest = hashlib.sha256(data or ident.peer_id.encode() + bytes([round % 256, stage])).digest()
    return signed(ident, gossip.announcement(round, stage, digest, len(data) or 1000, data=data, **kw))


def beat(ident: Identity, round: int = 0) -> pubsub.pb.PSMessage:
    return signed(ident, gossip.heartbeat(name="p", role="trainer", round=round, stage=0, finished=round - 1))


def held_bytes(book: gossip.Book) -> int:
    """Batch and message bytes the book holds for its announcements (an inline batch counted wherever it is)."""
    return sum(len(a.data) + len(m.data) for slot in book.announced.values() for a, m in slot.values())


# ---- 1. announcements: a window around the reference round, one table budget --------------------------------
def test_a_keeper_that_never_collects_still_takes_a_trainers_later_rounds():
    """The bootstrap keeper never collects: its own clock moves what it keeps, so round after round an honest
    trainer's announcements are held (catch-ups of late rounds find them), and old ones go."""
    keeper, trainer = Identity.generate(), Identity.generate()
    book = gossip.Book(keeper.peer_id, TOPIC, clock=Ticks(10.0))
    stages = 3
    for r in range(40):
        assert book.handle(signed(keeper, gossip.clock(r, time.time()))) == "c"
        for s in range(stages):
            assert book.handle(announce(trainer, r, s, member=member(finished=r - 1))) == "a"
            assert [a.peer_id for a in book.announcements(r, s)] == [trainer.peer_id], (r, s)
    # only the rounds around the clock are held
    assert {k[0] for k in book.announced} == set(range(40 - 1 - gossip.KEEP_ROUNDS, 40))
    assert len(book.slots_by[trainer.peer_id]) == (gossip.KEEP_ROUNDS + 1) * stages


def test_an_author_past_its_slots_gives_up_its_oldest_not_its_newest():
    """Without any reference (no clock, no round played), an author's slots are still capped: its oldest give
    way, so an honest peer's new rounds are taken however long the node has heard it."""
    me, trainer = Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(10.0))
    for r in range(gossip.MAX_SLOTS_PER_AUTHOR + 20):
        book.handle(announce(trainer, r, 0))
    last = gossip.MAX_SLOTS_PER_AUTHOR + 19
    assert [a.peer_id for a in book.announcements(last, 0)] == [trainer.peer_id]
    assert book.announcements(0, 0) == [] and len(book.slots_by[trainer.peer_id]) == gossip.MAX_SLOTS_PER_AUTHOR


def test_many_identities_with_inline_batches_stay_within_the_tables_budget(monkeypatch):
    """40 fresh identities sending inline batches near the clock, 20 more at far rounds: far rounds are
    refused, the rest is held within the table's byte budget (the oldest of unknown authors going first; a
    peer that delivered valid batches here keeps its announcement), and each inline batch is held once."""
    budget = 4 * 1024 * 1024
    monkeypatch.setattr(gossip, "MAX_ANNOUNCED_BYTES", budget, raising=False)
    me, honest = Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(10.0))
    book.handle(signed(me, gossip.clock(100, time.time())))  # this node's own clock: round 100
    book.vouch([honest.peer_id])
    batch = os.urandom(60_000)
    assert book.handle(announce(honest, 100, 0, batch)) == "a"
    far = [Identity.generate() for _ in range(20)]
    for ident in far:
        for k in range(6):
            book.handle(announce(ident, 2**31 - 1 - k, 0, os.urandom(60_000)))
    flood = [Identity.generate() for _ in range(40)]
    for ident in flood:
        for r in range(100, 106):
            book.handle(announce(ident, r, 0, os.urandom(60_000)))
    assert not any(k[0] > 100 + gossip.AHEAD_ROUNDS for k in book.announced)
    assert book.drops["gossip_ahead"] == 20 * 6
    assert held_bytes(book) <= budget
    assert book.drops["gossip_evicted"] > 0
    held = book.announcements(100, 0)
    mine = [a for a in held if a.peer_id == honest.peer_id]
    assert mine and mine[0].data == b"" and book.inline_data(mine[0]) == batch  # held once, and read back
    assert all(a.data == b"" for slot in book.announced.values() for a, _ in slot.values())


# ---- 2. clocks, members, and what a catch-up reply carries --------------------------------------------------
def test_clocks_of_untrusted_authors_neither_pile_up_nor_break_catch_up_replies():
    """1,200 fresh identities with a clock each: a node keeps a few of them at most and hands on only the
    trusted keeper's, so its catch-up replies stay decodable; a peer trusted later is followed at once."""
    me, keeper, late = Identity.generate(), Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(10.0), trusted={keeper.peer_id})
    assert book.handle(signed(keeper, gossip.clock(7, time.time()))) == "c"
    book.handle(signed(late, gossip.clock(9, time.time())))
    for _ in range(1200):
        book.handle(signed(Identity.generate(), gossip.clock(10**6, time.time())))
    assert len(book.clocks) <= 1 + gossip.MAX_UNTRUSTED_CLOCKS
    assert set(book.raw_clocks) == {keeper.peer_id}
    reply = gossip.decode_reply(gossip.encode_reply(book.catch_up_reply(-1, 0, random.Random(1))))
    assert [pubsub.verify_message(m) for m in reply] == [keeper.peer_id]
    assert book.clock_rounds({keeper.peer_id}) == [7] and book.reference == 7
    # A clock heard again after its author is trusted is followed.
    book.clock_rounds({keeper.peer_id, late.peer_id})
    book.handle(signed(late, gossip.clock(9, time.time())))
    assert book.clock_rounds({keeper.peer_id, late.peer_id}) == [7, 9] and book.reference == 9


def test_a_catch_up_reply_of_a_large_topic_is_cut_to_what_the_decoder_takes(monkeypatch):
    """More live members than a reply may carry (an honest topic of ~1,200 peers, or Sybils): the reply holds
    the trusted clock, the slot's announcements and known peers' heartbeats first, a sample of the rest, and
    is never more than decode_reply accepts."""
    monkeypatch.setattr(gossip, "CATCHUP_REPLY_BYTES", 4 * 1024 * 1024)  # only the item count binds here
    me, keeper, friend = Identity.generate(), Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(10.0), trusted={keeper.peer_id})
    book.vouch([friend.peer_id])
    book.handle(signed(keeper, gossip.clock(3, time.time())))
    for _ in range(1250):
        assert book.handle(beat(Identity.generate(), 3)) == "h"
    book.handle(beat(friend, 3))
    for _ in range(10):
        book.handle(announce(Identity.generate(), 3, 0))
    msgs = book.catch_up_reply(3, 0, random.Random(2))
    assert len(msgs) <= gossip.CATCHUP_MAX_ITEMS
    authors = [pubsub.verify_message(m) for m in gossip.decode_reply(gossip.encode_reply(msgs))]
    assert keeper.peer_id in authors and friend.peer_id in authors
    assert sum(1 for m in msgs if msgpack.unpackb(m.data)["k"] == "a") == 10


def test_members_are_capped_and_forgotten(monkeypatch):
    """Heartbeats of fresh identities past the members cap push out unknown ones, never a known peer; members
    quiet for MEMBER_FORGET are forgotten (with their heartbeats)."""
    monkeypatch.setattr(gossip, "MAX_MEMBERS", 200, raising=False)
    me, friend = Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(10.0))
    book.vouch([friend.peer_id])
    book.handle(beat(friend))
    for _ in range(600):
        book.handle(beat(Identity.generate()))
    assert len(book.members) <= 200 and len(book.raw_heartbeats) <= 200
    assert friend.peer_id in book.members
    book.live_members(now=time.time() + gossip.MEMBER_TTL + gossip.MEMBER_FORGET + 1)
    assert not book.members and not book.raw_heartbeats


# ---- 3. what a message may cost before it is refused --------------------------------------------------------
def peak_bytes(fn) -> int:
    """Bytes allocated at the peak while `fn()` runs (V.Invalid taken as its outcome)."""
    tracemalloc.start()
    try:
        fn()
    except gossip.V.Invalid:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


JUNK = [
    msgpack.packb({"k": "h", "x": [[]] * 21000}),  # 21 KB: 21,000 lists once unpacked
    msgpack.packb({"k": "a", "x": [[[[0] * 16] * 16] * 16] * 12}),  # 53 KB nested past the depth any message has
    msgpack.packb({"k": "a", "round": 1, **{f"f{i}": i for i in range(5000)}}),  # 5,000 fields
]


@pytest.mark.parametrize("junk", JUNK, ids=["21000-lists", "deep", "wide"])
def test_a_message_is_refused_before_its_objects_are_built(junk):
    author = Identity.generate()
    with pytest.raises(gossip.V.Invalid):
        gossip.parse(author.peer_id, junk)
    honest = gossip.announcement(3, 0, hashlib.sha256(b"z" * 60_000).digest(), 60_000, data=b"z" * 60_000,
                                 member=member())
    assert gossip.parse(author.peer_id, honest)[0] == "a"
    # what refusing it allocates: about its own bytes, not 50 bytes per object it would have built
    assert peak_bytes(lambda: gossip.parse(author.peer_id, junk)) < 2 * len(junk) + 64 * 1024
    book = gossip.Book(Identity.generate().peer_id, TOPIC, clock=Ticks(10.0))
    assert book.handle(signed(author, junk)) is None
    assert book.drops["gossip_malformed"] + book.drops["gossip_too_large"] == 1


def test_a_catch_up_reply_is_refused_before_its_objects_are_built():
    nested = msgpack.packb([[b"x", b"y", b"z", [[[0] * 16] * 16] * 100, b"s"]] * 20)
    many = msgpack.packb([[]] * 100_000)
    long = msgpack.packb([[b"f", b"d", b"s", ["t"] * 5000, b"g"]])
    for junk in (nested, many, long):
        with pytest.raises(gossip.V.Invalid):
            gossip.decode_reply(junk)
        assert peak_bytes(lambda: gossip.decode_reply(junk)) < 2 * len(junk) + 64 * 1024


def test_unknown_authors_share_one_budget_checked_before_their_signatures(monkeypatch):
    """Fresh identities, each within its own rate, together past the shared budget: dropped (`busy`, blamed on
    nobody) before their signature is checked; the known keeper's messages still go through."""
    monkeypatch.setattr(gossip, "UNKNOWN_BURST", 50.0, raising=False)
    checked = []
    verify = gossip.verify_message
    monkeypatch.setattr(gossip, "verify_message", lambda m: checked.append(1) or verify(m))
    me, keeper = Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(0.0), trusted={keeper.peer_id})
    taken = sum(1 for _ in range(300) if book.handle(beat(Identity.generate())) == "h")
    assert taken == 50 and book.drops["gossip_busy"] == 250 and len(checked) == 50
    assert book.handle(signed(keeper, gossip.clock(4, time.time()))) == "c"


def test_a_full_subscription_queue_drops_the_newest_of_unknown_authors():
    """Past its size the queue keeps the known authors' messages (handed on first) and drops the newest of the
    others, so that a flood of fresh identities cannot push the known peers' messages out."""
    sub = pubsub.Subscription(None, TOPIC, None, queue_size=4, priority=lambda m: m.data.startswith(b"known"))
    for i in range(4):
        sub.put(pubsub.pb.PSMessage(data=b"old %d" % i))
    sub.put(pubsub.pb.PSMessage(data=b"new"))  # full: the newest unknown one goes
    sub.put(pubsub.pb.PSMessage(data=b"known 1"))  # full: the oldest unknown one makes room
    assert sub.dropped["queue_full"] == 2
    out = []
    while (m := sub.get_nowait()) is not None:
        out.append(m.data)
    assert out == [b"known 1", b"old 1", b"old 2", b"old 3"]


# ---- 4. the stream servers ------------------------------------------------------------------------------------
class Writer:
    """A stream writer; with `stuck`, one whose peer never reads (drain never returns)."""

    def __init__(self, stuck: bool = False):
        self.out, self.stuck, self.closed = b"", stuck, False

    def write(self, b: bytes) -> None:
        self.out += b

    async def drain(self) -> None:
        if self.stuck:
            await asyncio.Event().wait()

    def close(self) -> None:
        self.closed = True


def request(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(len(data).to_bytes(8, "big") + data)
    reader.feed_eof()
    return reader


def test_catch_up_requests_are_rate_limited_per_requester_and_a_stuck_asker_is_let_go():
    me, keeper = Identity.generate(), Identity.generate()
    book = gossip.Book(me.peer_id, TOPIC, clock=Ticks(10.0), trusted={keeper.peer_id})
    book.handle(signed(keeper, gossip.clock(3, time.time())))
    for _ in range(50):
        book.handle(beat(Identity.generate(), 3))
    book.gate.clock = lambda: 0.0  # no refill during the test
    rng = random.Random(3)

    async def ask(who: str, stuck: bool = False) -> Writer:
        w = Writer(stuck)
        await asyncio.wait_for(gossip.serve_catchup(book, request(msgpack.packb([-1, 0])), w, rng, who), 60)
        return w

    async def main():
        greedy = [await ask("12D3KooWgreedy") for _ in range(int(gossip.CATCHUP_BURST) + 3)]
        other = await ask("12D3KooWother")
        book.gate.send_timeout, book.gate.send_rate = 0.2, 1e9
        stuck = await ask("12D3KooWstuck", stuck=True)  # returns: its reply is dropped at the deadline
        return greedy, other, stuck

    greedy, other, stuck = asyncio.run(main())
    answered = [len(w.out) > 8 for w in greedy]
    assert answered == [True] * int(gossip.CATCHUP_BURST) + [False] * 3 and all(w.closed for w in greedy)
    assert len(other.out) > 8 and stuck.closed
    assert book.gate.drops == {"over_rate": 3, "send_timeout": 1} and book.gate.active == 0
    assert book.gate.refused["12D3KooWgreedy"] == 3


def test_payload_handlers_at_once_are_capped():
    from types import SimpleNamespace

    server = payloads.PayloadServer(gate=payloads.StreamGate(2, 100.0, 100.0))
    server.put(3, 0, b"x" * 1000)

    async def main():
        silent = [asyncio.StreamReader() for _ in range(2)]  # peers that opened a stream and say nothing
        writers = [Writer() for _ in range(3)]
        tasks = [asyncio.create_task(server.handle(SimpleNamespace(peer_id=f"12D3KooW{i}"), r, w))
                 for i, (r, w) in enumerate(zip(silent, writers))]
        await asyncio.sleep(0)  # both admitted, waiting for their requests
        assert server.gate.active == 2
        await server.handle(SimpleNamespace(peer_id="12D3KooWthird"), request(msgpack.packb([3, 0])), writers[2])
        for r in silent:
            r.feed_eof()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return writers

    writers = asyncio.run(main())
    assert writers[2].closed and writers[2].out == b"" and server.gate.drops["busy"] == 1
    assert server.gate.active == 0
    # with room again, it is served
    w = Writer()

    async def again():
        await server.handle(SimpleNamespace(peer_id="12D3KooWthird"), request(msgpack.packb([3, 0])), w)

    asyncio.run(again())
    assert int.from_bytes(w.out[:8], "big") == 1000


def test_a_puller_that_never_reads_is_let_go_at_a_deadline_over_real_p2pd(tmp_path):
    """A real pull of a 4 MB payload whose puller never reads its stream: the serving handler gives up at its
    deadline (counted), frees its slot, and serves the next pull as before."""
    from hivemind.p2p import PeerID

    from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig

    nodes = []
    try:
        for name in ("server", "puller"):
            ident = Identity.load_or_create(tmp_path / f"{name}.key")
            boot = nodes[0].maddrs if nodes else []
            nodes.append(HivemindNode(ident, tmp_path / f"{name}.key",
                                      NetConfig(host="127.0.0.1", initial_peers=boot)).start())
        server_node, puller = nodes
        server = payloads.PayloadServer(gate=payloads.StreamGate(4, 100.0, 100.0, send_timeout=1.0,
                                                                 send_rate=4 * 1024 * 1024))
        big, small = os.urandom(4 * 1024 * 1024), os.urandom(1000)
        server.put(3, 0, big)
        server.put(3, 1, small)
        server_node.call(server_node.p2p.add_binary_stream_handler(payloads.PROTOCOL, server.handle), timeout=30)

        async def never_read():
            _, reader, writer = await puller.p2p.call_binary_stream_handler(
                PeerID.from_base58(server_node.peer_id), payloads.PROTOCOL)
            req = msgpack.packb([3, 0])
            writer.write(len(req).to_bytes(8, "big") + req)
            await writer.drain()
            return reader, writer  # kept open, never read

        streams = [puller.call(never_read(), timeout=30)]  # held open until the nodes close
        wait_until(lambda: server.gate.drops["send_timeout"] == 1 and server.gate.active == 0, 60,
                   "the stuck reply dropped at its deadline", lambda: str(server.gate.drops))
        assert server.served == 0
        got = puller.call(payloads.pull(puller.p2p, server_node.peer_id, 3, 1, max_bytes=1 << 20, timeout=30),
                          timeout=40)
        assert got == small and len(streams) == 1
        wait_until(lambda: server.served == 1 and server.gate.active == 0, 60, "the next pull served")  # once it closed
    finally:
        for n in reversed(nodes):
            n.close()

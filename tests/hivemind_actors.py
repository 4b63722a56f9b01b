"""Misbehaving peers for tests/test_hivemind.py, run as separate processes:

    python tests/hivemind_actors.py hostile KEY EXPERIMENT ROUNDS INITIAL_PEER
    python tests/hivemind_actors.py skewed  KEY SECONDS      (prints its multiaddr, serves a skewed clock)

The hostile peer joins as a trainer, announces bad payloads for every round (a different kind each round)
on the swarm's topic, and tries to speak for the honest peers: heartbeats that name them as author but
carry its own signature, handed out to whoever asks it to catch up, and forged member records in the DHT.
It prints one line per attack and stays up, announcing its batches again now and then, until it is killed."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import msgpack
from hivemind.p2p import PeerID
from hivemind.proto import p2pd_pb2 as pb
from hivemind.utils import get_dht_time

from p2pswarm import wire
from p2pswarm.comm.hivemind import gossip, pubsub, records
from p2pswarm.comm.hivemind.manager import HivemindComm
from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig
from p2pswarm.identity import Identity
from p2pswarm.types import Group, Task

KINDS = ["forged", "malformed", "oversized", "replayed", "wrong_swarm"]


def honest_looking(identity: Identity, swarm: str, round: int) -> bytes:
    g = Group(Task("x", "basic_arithmetic", "What is 1+1?", "2"), ["<answer>2</answer>"] * 4, identity.peer_id, [1.0] * 4)
    return wire.encode(wire.RolloutBatch(swarm, round, 0, identity.peer_id, [g]), identity)


def payload(kind: str, identity: Identity, swarm: str, round: int) -> bytes:
    if kind == "forged":  # a valid batch whose body was changed after signing
        env = msgpack.unpackb(honest_looking(identity, swarm, round))
        env["body"] = env["body"].replace(b"What is 1+1?", b"What is 9+9?")
        return msgpack.packb(env)
    if kind == "malformed":
        return b"\xc1not msgpack at all" * 10
    if kind == "oversized":
        return b"\x00" * (wire.Limits().max_bytes + 1024)
    if kind == "replayed":  # our own valid batch of an earlier round, served again as this round's
        return honest_looking(identity, swarm, max(0, round - 1))
    if kind == "wrong_swarm":
        return honest_looking(identity, "another-swarm", round)
    raise ValueError(kind)


class ForgingValidator(records.Ed25519OwnerValidator):
    """Signs records under anyone's marker with our own key: what an attacker would try."""

    def sign_value(self, record):
        return record.value + b"[sig:" + self.identity.sign(self._payload(record)).hex().encode() + b"]"


def hostile(key: str, swarm: str, rounds: int, peer: str) -> None:
    identity = Identity.load_or_create(key)
    node = HivemindNode(identity, key, NetConfig(initial_peers=[peer], host="127.0.0.1"))
    node.validator = ForgingValidator(identity)  # only for records we store; honest peers validate with theirs
    node.start()
    comm = HivemindComm(node, swarm, name="mallory", timeout=1.0)
    comm.server.keep_rounds = rounds + 10  # keep every round servable
    batches: dict[int, tuple[bytes, int]] = {}  # round -> (digest, announced size)

    def announce(r: int) -> None:
        kind = KINDS[r % len(KINDS)]
        data = payload(kind, identity, swarm, r)
        comm.server.put(r, 0, data)
        announced = len(data) if kind != "oversized" else 1000  # lie about the size: the puller must still refuse
        batches[r] = (hashlib.sha256(data).digest(), announced)
        node.call(comm._announce(gossip.announcement(r, 0, *batches[r])), timeout=30)
        print(f"announced round {r}: {kind}", flush=True)

    for r in range(rounds):
        announce(r)

    async def overwrite(victim: str) -> tuple[bool, bool]:
        forged = await node.dht.store(records.members_key(swarm), {"name": "pwned", "role": "trainer", "round": 999,
                                      "stage": 0, "finished": 999, "time": time.time(), "left": True},
                                      get_dht_time() + 60, subkey=records.marker(victim))
        plain = await node.dht.store(records.members_key(swarm), {"name": "fake", "role": "trainer"},
                                     get_dht_time() + 60, subkey=victim)
        # On the topic: a heartbeat "from" the victim, signed by us, served to every catch-up request.
        msg = pb.PSMessage(data=gossip.heartbeat(name="pwned", role="trainer", round=999, stage=0, finished=999,
                                                 left=True), seqno=os.urandom(8), topicIDs=[comm.topic])
        setattr(msg, "from", PeerID.from_base58(victim).to_bytes())
        msg.signature = identity.sign(pubsub.SIGN_PREFIX + msg.SerializeToString())
        forgeries.append(msg)
        return forged, plain

    forgeries: list = []
    honest_reply = comm.book.catch_up_reply
    comm.book.catch_up_reply = lambda r, s, rng: forgeries + honest_reply(r, s, rng)
    # Until the test kills it: attack each member once as it appears, and keep a bad batch announced for each
    # of the next rounds the honest peers play (a topic message reaches only those subscribed when it is sent,
    # and on a fast machine they are past the first `rounds` rounds within seconds); announce the recent ones
    # again now and then (honest peers may take a while to start on a busy machine).
    attacked: set[str] = set()
    announced_at = time.monotonic()
    while True:
        members = node.call(comm.fetch_members(), timeout=30)
        for victim in set(members) - attacked - {identity.peer_id}:
            forged, plain = node.call(overwrite(victim), timeout=30)
            attacked.add(victim)
            print(f"overwrite {victim}: forged stored={forged}, unowned stored={plain}", flush=True)
        playing = [m.round for p, m in members.items() if p != identity.peer_id and m.role == "trainer"]
        if playing:
            for r in range(max(0, max(playing)), max(playing) + len(KINDS) + 1):
                if r not in batches:
                    announce(r)
        if time.monotonic() - announced_at > 5:
            for r in sorted(batches)[-2 * len(KINDS):]:
                node.call(comm._publish(gossip.announcement(r, 0, *batches[r])), timeout=30)
            announced_at = time.monotonic()
        time.sleep(0.5)


def skewed(key: str, seconds: float) -> None:
    identity = Identity.load_or_create(key)
    node = HivemindNode(identity, key, NetConfig(host="127.0.0.1"), clock=lambda: time.time() + seconds).start()
    print(node.maddrs[0], flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    if sys.argv[1] == "hostile":
        hostile(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "skewed":
        skewed(sys.argv[2], float(sys.argv[3]))

"""Adversaries for tests/test_trust.py, one process per class of attack, as a new attacker would try them:

    python tests/attackers.py KIND KEY EXPERIMENT BOOTSTRAP_MADDR

    numbers    well-signed heartbeats / announcements / clocks on the swarm's topic whose numbers are out of
               every range (inf, nan, -1e308, 2**62, negative sizes), sent all the time
    stall      a "trainer" whose heartbeat always says it plays the current round and never finishes it
    censor     announces a relay of every other peer's batch (garbage bytes, before and after they publish)
    poison     real tasks whose answer was changed to match its wrong completions, properly signed
    name       calls itself after an honest peer ("bob") and sends bad batches under that name
    unsigned   junk on the topic: bytes that are not msgpack, unknown kinds, oversized messages, and more
               messages a second than any peer may send
    flood      declares it bridges 1024 peers and relays batches of hundreds of invented identities

Each prints one line per attack and runs until killed. Every process is a real hivemind peer."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time

import msgpack

from p2pswarm import wire
from p2pswarm.comm.hivemind.manager import HivemindComm
from p2pswarm.comm.hivemind.node import HivemindNode, NetConfig
from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.identity import Identity
from p2pswarm.types import Group

ROUNDS = 12  # rounds ahead to attack (the honest peers play fewer)


def poisoned(identity: Identity, swarm: str, round: int, data: ReasoningGymData) -> bytes:
    groups = []
    for t in data.round_tasks(round)[:4]:
        t.answer = "12345"  # the sender's "ground truth", changed to match its completions
        groups.append(Group(t, ["<answer>12345</answer>"] * 4, identity.peer_id, rewards=[1.0] * 4))
    return wire.encode(wire.RolloutBatch(swarm, round, 0, identity.peer_id, groups), identity)


class Attacker:
    def __init__(self, kind: str, key: str, swarm: str, boot: str):
        self.kind, self.swarm = kind, swarm
        self.identity = Identity.load_or_create(key)
        self.node = HivemindNode(self.identity, key, NetConfig(initial_peers=[boot], host="127.0.0.1")).start()
        name = "bob" if kind == "name" else kind
        self.comm = HivemindComm(self.node, swarm, name=name, timeout=1.0)
        self.comm._refresher.cancel()  # the attack writes this peer's heartbeats itself
        self.comm.server.keep_rounds = ROUNDS + 10
        self.data = ReasoningGymData("easy", seed=666, tasks_per_round=8, peer=self.identity.peer_id)

    def say(self, line: str) -> None:
        print(f"{self.kind}: {line}", flush=True)

    async def send(self, data: bytes) -> bool:
        try:
            await self.comm._publish(data)
            return True
        except Exception as e:  # noqa: BLE001 - an attacker shrugs
            self.say(f"publish failed: {type(e).__name__}")
            return False

    async def member(self, **fields) -> bool:
        value = {"k": "h", "name": self.comm.name, "role": "trainer", "round": 0, "stage": 0, "finished": -1,
                 "time": time.time(), "left": False, "bridged": 0, **fields}
        return await self.send(msgpack.packb(value))

    async def announce(self, round: int, data: bytes, origin: str | None = None, **overrides) -> bool:
        self.comm.server.put(round, 0, data, origin or "")
        value = {"k": "a", "round": round, "stage": 0, "digest": hashlib.sha256(data).digest(), "size": len(data),
                 "created": time.time(), **({"origin": origin} if origin else {}), **overrides}
        return await self.send(msgpack.packb(value))

    async def others(self) -> set[str]:
        members = await self.comm.fetch_members()
        return {p for p in members if p != self.identity.peer_id}

    async def clock(self) -> int:
        return max((c.round for c in self.comm.book.clocks.values()), default=0)

    # ---- the attacks ---------------------------------------------------------------------------------------
    async def numbers(self) -> None:
        bad_members = [
            {"bridged": float("inf")}, {"round": 2**62, "finished": 2**62}, {"time": float("nan")},
            {"finished": float("-inf")}, {"stage": -7, "bridged": -1e308}, {"round": float("nan")},
        ]
        bad_announcements = [
            {"created": -1e308}, {"created": float("nan")}, {"size": -5}, {"size": 2**63 - 1},
            {"created": float("inf")}, {"digest": b"\x00" * 5},
        ]
        i = 0
        while True:
            await self.member(**bad_members[i % len(bad_members)])
            for r in range(ROUNDS):
                await self.announce(r, poisoned(self.identity, self.swarm, r, self.data),
                                    **bad_announcements[(i + r) % len(bad_announcements)])
            await self.send(msgpack.packb({"k": "c", "round": 2**62, "started": float("nan")}))
            self.say(f"wave {i}")
            i += 1
            await asyncio.sleep(1)

    async def stall(self) -> None:
        while True:
            c = await self.clock()
            await self.member(round=c, finished=c - 1)
            self.say(f"playing round {c}, never finishing")
            await asyncio.sleep(0.5)

    async def censor(self) -> None:
        garbage = b"\x92censored"
        while True:
            victims = await self.others()
            await self.member(bridged=1)
            for r in range(ROUNDS):
                for v in victims:
                    await self.announce(r, garbage + v.encode(), origin=v)
            self.say(f"claimed relays of {len(victims)} peer(s)")
            await asyncio.sleep(1)

    async def again(self, batches: dict[int, bytes], **member) -> None:
        """Until killed: a heartbeat at the swarm's round, and the announcements of the current and next round
        again every few seconds, so peers that join later hear them too (a message is heard only by those
        subscribed when it is sent)."""
        while True:
            c = await self.clock()
            await self.member(round=c, **member)
            for r in (c, c + 1):
                if r in batches:
                    await self.announce(r, batches[r])
            await asyncio.sleep(2)

    async def poison(self) -> None:
        await self.member()
        batches = {r: poisoned(self.identity, self.swarm, r, self.data) for r in range(ROUNDS)}
        for r, data in batches.items():
            await self.announce(r, data)
        self.say(f"announced {ROUNDS} poisoned rounds")
        await self.again(batches)

    async def name(self) -> None:
        batches = {r: b"\xc1" * 50 for r in range(ROUNDS)}
        for r, data in batches.items():
            await self.announce(r, data)
        self.say("calls itself bob")
        await self.again(batches)

    async def unsigned(self) -> None:
        junk = [b"\x00junk", b"\xc1" * 40, msgpack.packb([1, 2, 3]), msgpack.packb({"not": "a message"}),
                msgpack.packb({"k": "zz", "round": 1}), msgpack.packb({"k": "h", "name": "x" * 2000, "role": "trainer"}),
                msgpack.packb({"k": "a", "round": 0, "stage": 0, "digest": b"\x00" * 32, "size": 10,
                               "created": time.time(), "pad": b"\x00" * 5000}),
                msgpack.packb({"k": "h", "nested": [[[[[[[[1]]]]]]]]})]
        while True:
            for j in junk:
                await self.send(j)
            for _ in range(120):  # past any author's rate
                await self.send(msgpack.packb({"k": "zz"}))
            self.say("sent junk on the topic")
            await asyncio.sleep(2)

    async def flood(self) -> None:
        await self.member(bridged=1024)
        relays: dict[int, list[tuple[str, bytes]]] = {}
        for r in range(ROUNDS):
            fakes = [Identity.generate() for _ in range(200)]
            relays[r] = [(f.peer_id, poisoned(f, self.swarm, r, self.data)) for f in fakes]
            await asyncio.gather(*(self.announce(r, data, origin=o) for o, data in relays[r]))
            self.say(f"round {r}: relayed 200 invented peers")
        while True:  # the current and next round's 200 again, every second: far past any author's rate, and
            # ahead of peers whose rounds take less than a second (a relay for a round they have left is stale)
            c = await self.clock()
            await self.member(bridged=1024, round=c)
            await asyncio.gather(*(self.announce(r, data, origin=o) for r in (c, c + 1) for o, data in relays.get(r, [])))
            await asyncio.sleep(1)


def main() -> None:
    kind, key, swarm, boot = sys.argv[1:5]
    a = Attacker(kind, key, swarm, boot)
    a.say(f"up as {a.identity.peer_id}")
    a.node.call(getattr(a, kind)(), timeout=None)


if __name__ == "__main__":
    main()

"""The swarm over hivemind: the DHT says who has what, payloads are pulled peer to peer.

publish(r, s): keep the signed wire bytes in this peer's PayloadServer, then announce "I have (r, s),
               digest D, size N" as an owner-signed DHT record.
collect(r, s): poll the announcements (and the member list) until `want_peers` peers (0: every live
               member) delivered a valid batch or the deadline passes; pull new announcers' payloads in
               parallel, each under a timeout; check digest, then wire.Inbox (signature, peer id = the
               announcer = the stream's authenticated peer, swarm, round window, size, replay).
Anything invalid is dropped and counted by reason, overall and per peer; nothing a peer sends can raise
into the round.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from typing import Any

from p2pswarm import wire
from p2pswarm.comm.hivemind import records
from p2pswarm.comm.hivemind.node import HivemindNode
from p2pswarm.comm.hivemind.payloads import PROTOCOL, PayloadServer, PullError, pull
from p2pswarm.comm.core import MAX_RELAYED_ORIGINS, SignedTransport, collect_need
from p2pswarm.components import PeerInfo
from p2pswarm.types import Group

log = logging.getLogger(__name__)

SILENT_ROUNDS = 2  # collects a live member may deliver nothing in before it is no longer waited for
MEMBER_TTL = 15.0  # a SIGKILLed peer drops out of the member list this long after its last refresh
MEMBER_REFRESH = 5.0


class HivemindComm(SignedTransport):
    def __init__(self, node: HivemindNode, swarm: str, *, name: str = "", role: str = "trainer",
                 timeout: float = 10.0, want_peers: int = 0, poll: float = 0.1,
                 limits: wire.Limits = wire.Limits(), own_node: bool = True):
        super().__init__(node.identity, swarm, name=name, timeout=timeout, want_peers=want_peers, limits=limits)
        self.node = node
        self.role = role
        self.poll = poll
        self.own_node = own_node
        self.server = PayloadServer()
        self.record_ttl = max(60.0, 4 * timeout)
        self.latencies: list[float] = []  # publish-to-delivery seconds of the last collect
        self.record_drops: Counter[str] = Counter()
        self._bad_seen: set = set()
        self.members: dict[str, records.Member] = {}
        self.seen_peers: set[str] = set()
        self.silent: Counter[str] = Counter()  # collects in a row each expected member delivered nothing in
        self.position = {"round": -1, "stage": 0, "finished": -1}
        self.paused = False
        self._closed = False
        node.call(node.p2p.add_binary_stream_handler(PROTOCOL, self.server.handle), timeout=30)
        node.call(self._store_member(), timeout=30)
        self._members_at = 0.0  # monotonic time of the last member-list fetch
        self._refresher = node.spawn(self._refresh_member_loop())

    # ---- membership -------------------------------------------------------------------------------------
    async def _store_member(self, left: bool = False) -> bool:
        from hivemind.utils import get_dht_time

        value = {"name": self.name, "role": self.role, **self.position, "time": time.time(), "left": left,
                 "bridged": self.bridged, "paused": self.paused}
        return await self.node.dht.store(records.members_key(self.swarm), value, get_dht_time() + MEMBER_TTL,
                                         subkey=self.node.validator.marker)

    async def _refresh_member_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(MEMBER_REFRESH)
            if self._closed:
                break
            try:
                await self._store_member()
            except Exception as e:  # noqa: BLE001 - the next refresh tries again
                log.debug("member refresh failed: %s", e)

    async def fetch_members(self) -> dict[str, records.Member]:
        """Members of this swarm whose record has not expired and who have not left (self included)."""
        got = await self.node.dht.get(records.members_key(self.swarm), latest=True)
        self._members_at = asyncio.get_running_loop().time()
        if got is None and self.members:  # an overloaded DHT answered nothing: keep the last view
            return self.members
        members = {m.peer_id: m for m in self.parse_records(got, records.member)}
        self.seen_peers.update(p for p in members if p != self.peer_id)
        self.names.update({p: m.name for p, m in members.items()})  # kept after they leave, for the counters
        self.members = {p: m for p, m in members.items() if not m.left}
        for p in [p for p in self.silent if p not in self.members]:
            del self.silent[p]  # a peer that left (or died) and comes back is waited for again
        return self.members

    def parse_records(self, result: Any, parse, relays: bool = False) -> list:
        """The valid records of a DHT reply, parsed; bad ones are counted once each (the same record comes
        back on every poll)."""
        if len(self._bad_seen) > 100_000:  # bound the memory that remembering costs
            self._bad_seen.clear()
        return records.parse_entries(result, self.record_drops, parse, self._bad_seen, relays=relays,
                                     blame=self._blame_record)

    def _blame_record(self, owner: str, reason: str) -> None:
        """A record its owner signed but whose fields are bad: counted under the owner, a strike toward a ban
        (the overall count is already in record_drops)."""
        self.per_peer[owner][f"dropped_{reason}"] += 1
        self.ledger.offense(owner, "malformed")

    def live_trainers(self) -> set[str]:
        """Other members that train and play now (a paused one is waited for by nobody)."""
        return {p for p, m in self.members.items() if m.role == "trainer" and not m.paused and p != self.peer_id}

    def live_peers(self) -> set[str]:
        return self.live_trainers()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.set_position()

    def set_position(self, **fields: int) -> None:
        """Update this peer's member record now (round, stage, finished)."""
        self.position.update(fields)
        try:
            self.node.call(self._store_member(), timeout=10)
        except Exception as e:  # noqa: BLE001 - the periodic refresh will carry it
            log.debug("member update failed: %s", e)

    # ---- publish ----------------------------------------------------------------------------------------
    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        data = self.encode(round, stage, groups)
        self.server.put(round, stage, data)
        self.position.update(round=round, stage=stage)
        try:
            self.node.call(self._announce(round, stage, hashlib.sha256(data).digest(), len(data)), timeout=30)
        except Exception as e:  # noqa: BLE001 - the round goes on; peers that saw nothing train without us
            log.warning("could not announce round %d stage %d: %s: %s", round, stage, type(e).__name__, e)
            return
        self.count_sent(data)

    def relay(self, round: int, stage: int, origin: str, data: bytes) -> None:
        """Serve and announce another peer's signed payload (a bridge from the Drive side); receivers check
        its signature against `origin`, so a bridge can pass payloads on but cannot alter them."""
        self.server.put(round, stage, data, origin)
        try:
            self.node.call(self._announce(round, stage, hashlib.sha256(data).digest(), len(data), origin), timeout=30)
        except Exception as e:  # noqa: BLE001
            log.warning("could not relay %s's round %d stage %d: %s: %s", origin[-8:], round, stage, type(e).__name__, e)
            return
        self.relayed += 1

    async def _announce(self, round: int, stage: int, digest: bytes, size: int, origin: str | None = None) -> None:
        from hivemind.utils import get_dht_time

        marker = self.node.validator.marker
        value = {"digest": digest, "size": size, "created": time.time()}
        stores = [self.node.dht.store(records.rollouts_key(self.swarm, round, stage), value,
                                      get_dht_time() + self.record_ttl,
                                      subkey=marker if origin is None else records.relay_subkey(marker, origin))]
        if origin is None:
            stores.append(self._store_member())  # at once: both in a row made publish 2x slower
        ok, *_ = await asyncio.gather(*stores)
        if not ok:
            log.warning("announcing round %d stage %d: no DHT peer stored the record", round, stage)

    # ---- collect ----------------------------------------------------------------------------------------
    def collect(self, round: int, stage: int) -> list[Group]:
        t0 = self.begin_collect(round)
        try:
            groups = self.node.call(self._collect(round, stage), timeout=self.timeout + 30)
        except Exception as e:  # noqa: BLE001 - our own p2p side failed (peers' input cannot raise here)
            log.warning("collect of round %d stage %d failed (%s: %s); going on without the swarm",
                        round, stage, type(e).__name__, e)
            groups = []
        self.end_collect(t0)
        return groups

    async def _collect(self, round: int, stage: int) -> list[Group]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self.latencies = []
        valid: set[str] = set()  # signers whose batch was accepted
        failed: set[str] = set()  # signers whose own (direct) payload failed this round
        groups: list[Group] = []
        pending: set[asyncio.Task] = set()
        delay = self.poll
        key = records.rollouts_key(self.swarm, round, stage)
        direct: dict[str, records.Announcement] = {}  # each signer's own announcement
        tried_direct: set[str] = set()
        retried: set[str] = set()
        relay_tried: set[tuple[str, str]] = set()  # (relaying peer, origin)
        relaying: set[str] = set()  # origins with a relayed pull in flight
        relays_by: Counter[str] = Counter()  # distinct origins each peer relayed this collect
        refused: set[tuple[str, str, str]] = set()  # (peer, origin, reason) already counted
        expected: set[str] = set()

        def refuse(peer: str, origin: str, reason: str) -> None:
            if (peer, origin, reason) not in refused:  # the same record comes back on every poll
                refused.add((peer, origin, reason))
                self.drop(peer, reason)

        def start(a: records.Announcement) -> None:
            pending.add(asyncio.create_task(self._fetch(a, round, stage, deadline)))

        while True:
            remaining = max(0.05, deadline - loop.time())
            gets = [self.node.dht.get(key, latest=True)]
            if loop.time() - self._members_at > 1.0:  # the member list changes slowly; it costs a signature a member
                gets.append(self.fetch_members())
            try:
                got, *_ = await asyncio.wait_for(asyncio.gather(*gets), remaining)
            except Exception as e:  # noqa: BLE001 - a DHT hiccup or the deadline; poll again or stop below
                log.debug("DHT get failed: %s", e)
                got = None
            announced = self.parse_records(got, records.announcement, relays=True)
            # Origins' own announcements first: a relay claim never pre-empts or replaces the origin's copy.
            for a in sorted(announced, key=lambda a: a.origin is not None):
                server = a.peer_id
                if server == self.peer_id or a.signer == self.peer_id:
                    continue
                if self.ledger.banned(server):
                    refuse(server, a.signer, "banned")
                    continue
                if a.origin is None:
                    direct[server] = a
                    if server not in valid and server not in tried_direct:
                        tried_direct.add(server)
                        start(a)
                    continue
                origin = a.origin
                if origin in direct:  # the origin serves it itself: a relay must be of exactly that batch
                    if direct[origin].digest != a.digest:
                        refuse(server, origin, "relay_mismatch")
                    continue
                if origin in valid or origin in relaying or (server, origin) in relay_tried:
                    continue
                if relays_by[server] >= self.relay_cap(server):
                    refuse(server, origin, "relay_limit")  # invented origins flooding through one peer
                    continue
                relays_by[server] += 1
                relay_tried.add((server, origin))
                relaying.add(origin)
                start(a)
            expected = self.expected_peers(round)
            bridged = sum(min(self.members[p].bridged, self.relay_cap(p)) for p in expected
                          if p in self.members and self.per_peer[p]["relays"] > 0)  # bridges that relayed before
            need = collect_need(want_peers=self.want_peers, live=len(expected), bridged=bridged,
                                failed=len(failed & expected))
            remaining = deadline - loop.time()
            # With nobody expected (need 0), pulls already in flight still finish: an announcer that is not
            # (yet) in our member view is a peer too.
            if remaining <= 0 or (len(valid) >= need and (need > 0 or not pending)):
                break
            if pending:
                done, pending = await asyncio.wait(pending, timeout=min(delay, remaining),
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    a, batch, retry = task.result()
                    if batch is not None:
                        valid.add(a.signer)
                        groups.extend(batch.groups)
                    elif a.origin is not None:
                        relaying.discard(a.origin)  # another relay, or the origin itself, may still come
                    elif retry and a.signer not in retried and deadline - loop.time() > 0.5:
                        retried.add(a.signer)  # a reset stream or a peer busy for a moment: once more
                        start(a)
                    else:
                        failed.add(a.signer)
            else:
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 1.5, 0.3)  # bounds what polling adds to delivery latency
        for task in pending:
            task.cancel()
        for p in expected - valid:  # a member that never delivers stops being waited for (it is still pulled)
            self.silent[p] += 1
        for p in valid:  # ... until it delivers again, waited for or not
            self.silent.pop(p, None)
        return groups

    def behind(self, finished: int) -> set[str]:
        """Live trainers in good standing still playing round `finished` or an earlier one: the peers a node
        that finished it waits for before the next round, so that fast and slow (or restarted) peers stay on
        one round. Good standing: not banned and has delivered valid batches before; a fresh identity that
        never did (a Sybil claiming to play) holds nobody up, and the keeper's round deadline bounds the rest."""
        return {p for p in self.live_trainers()
                if self.members[p].round <= finished and self.members[p].finished < finished
                and (stats := self.per_peer.get(p)) is not None and stats["batches"] > 0 and not self.ledger.banned(p)}

    def caught_up(self, peers: set[str], finished: int) -> None:
        """`peers` were waited for and have now finished round `finished`: they play along again, so collects
        wait for them again even if they were silent while behind."""
        for p in peers:
            if p in self.members and self.members[p].finished >= finished:
                self.silent.pop(p, None)

    def relay_cap(self, peer: str) -> int:
        """Distinct origins one peer may relay per stage: what its member record declares, bounded."""
        m = self.members.get(peer)
        return max(1, min(m.bridged if m else 0, MAX_RELAYED_ORIGINS))

    def expected_peers(self, round: int) -> set[str]:
        """Live trainers a collect of `round` waits for: not banned, not already past the round (a peer that
        joined late and skipped it will not publish it), and not silent for SILENT_ROUNDS collects in a
        row (a member that only pretends to train would otherwise cost every stage its full timeout)."""
        return {p for p in self.live_trainers() if self.members[p].round <= round and not self.ledger.banned(p)
                and self.silent[p] < SILENT_ROUNDS}

    async def _fetch(self, a: records.Announcement, round: int, stage: int,
                     deadline: float) -> tuple[records.Announcement, wire.RolloutBatch | None, bool]:
        """(the announcement, batch or None, whether another try could succeed)."""
        try:
            return a, await self._fetch_batch(a, round, stage, deadline), False
        except PullError:
            return a, None, True

    async def _fetch_batch(self, a: records.Announcement, round: int, stage: int, deadline: float) -> wire.RolloutBatch | None:
        server = a.peer_id  # who serves it: the origin itself, or a relaying peer, is who answers for it
        if a.size > self.limits.max_bytes:
            self.drop(server, "too_large")
            return None
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            data = await pull(self.node.p2p, server, round, stage, max_bytes=self.limits.max_bytes,
                              timeout=max(0.5, remaining), origin=a.origin)
        except PullError as e:
            self.drop(server, e.reason)
            if e.reason in ("truncated", "unreachable", "pull_timeout"):
                raise
            return None
        if hashlib.sha256(data).digest() != a.digest:
            self.drop(server, "digest_mismatch")
            return None
        batch = await asyncio.get_running_loop().run_in_executor(  # decoding and re-deriving tasks take CPU
            None, lambda: self.accept(data, round=round, stage=stage, sender=a.signer, via=a.origin and server))
        if batch is None:
            return None
        latency = min(max(0.0, time.time() - a.created), self.timeout + 3600.0)
        self.latencies.append(latency)
        self.per_peer[a.signer]["latency_ms"] = int(latency * 1000)
        if a.origin is None:
            await asyncio.get_running_loop().run_in_executor(None, self.pass_on, round, stage, batch, data)
        return batch

    # ---- reporting --------------------------------------------------------------------------------------
    def peers(self) -> list[PeerInfo]:
        return [self.peer_info(p, m.name, m.round, m.time)
                for p, m in list(self.members.items()) if p != self.peer_id and m.role == "trainer"]

    def counters(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        out: dict[str, Any] = {
            **super().counters(), "bytes_served": self.server.bytes_served, "batches_relayed": self.relayed,
            "pulls_refused": sum(self.server.refused.values()),
            "peers_seen": len(self.seen_peers), "peers_live": len(self.live_trainers()),
            "collect_ms": int(self.last_collect_seconds * 1000),
            "delivery_ms_p50": int(lat[len(lat) // 2] * 1000) if lat else 0,
        }
        rejected = self.node.validator.rejected + self.record_drops
        out.update({f"dropped_{k}": v for k, v in rejected.items()})
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._refresher.cancel()
        if self.node.alive():  # p2pd gone (Ctrl-C reaches it too): nobody to tell
            try:
                self.node.call(asyncio.wait_for(self._store_member(left=True), 2), timeout=3)
            except Exception as e:  # noqa: BLE001
                log.debug("leaving: %s", e)
        self.run_close_callbacks()
        if self.own_node:
            self.node.close()

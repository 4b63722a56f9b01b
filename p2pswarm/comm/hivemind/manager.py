"""The swarm over hivemind: small signed messages on the swarm's GossipSub topic say who is there and who has
what; payloads are pulled peer to peer.

publish(r, s): keep the signed wire bytes in this peer's PayloadServer, then announce "I have (r, s),
               digest D, size N, G groups with signal" on the topic (gossip.py), with this peer's heartbeat
               fields in it; once more at half the collect timeout only when the topic had fewer peers
               than the mesh wants at publish time (a mesh still forming; otherwise lost copies are
               what the collectors' catch-up is for). A small batch may travel in the announcement
               itself (client mode, or gossip_inline), for peers nobody can dial.
collect(r, s): draw `sample_peers` (K) announcers uniformly among those heard by a cutoff (peers with a
               history of valid batches first: core.sample_sources), pull their payloads in parallel, each
               under a timeout, replacing failed pulls by fresh draws, until `want_peers` (else every
               expected peer, at most K) delivered a valid batch or the deadline passes; while short of
               that past the cutoff with no pull in flight (an announcement lost, or sent before we joined),
               ask a few peers directly what they heard (a capped catch-up, at the cutoff and then after
               2, 4, 8 ... 30 s while still short). A failed pull that could succeed is tried once more.
               Every payload is checked: digest, then wire.Inbox (signature, peer id = the announcer = the
               stream's authenticated peer, swarm, round window, size, replay).
membership:    live = heard within 15 s. Every own announcement is also a heartbeat; a separate heartbeat
               goes out when nothing carrying one went out for 5 s, and at once when the finished round
               or the pause changes (the keeper's quorum and the holders wait on those). Each topic
               message costs every peer a forward to its mesh, so fewer messages is what keeps a
               peer's traffic near flat in N (bench/README.md, issue #13).
Anything invalid is dropped and counted by reason, overall and per peer; nothing a peer sends can raise
into the round. The DHT carries no swarm record: it is the routing that gossip forms its mesh over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections import Counter
from typing import Any

from p2pswarm.bounded import Recent, RecentCounter
from p2pswarm import wire
from p2pswarm.comm.hivemind import gossip, records
from p2pswarm.comm.hivemind.node import HivemindNode, peer_id_of
from p2pswarm.comm.hivemind.payloads import PROTOCOL, PayloadServer, PullError, pull, requester_of
from p2pswarm.comm.hivemind.pubsub import Subscription, publish, topic_peers
from p2pswarm.comm.core import MAX_RELAYED_ORIGINS, SignedTransport, collect_need, sample_sources
from p2pswarm.components import PeerInfo
from p2pswarm.types import Group

log = logging.getLogger(__name__)

SILENT_ROUNDS = 2  # collects a live member may deliver nothing in before it is no longer waited for
MEMBER_TTL = gossip.MEMBER_TTL
CATCHUP_PEERS = 3  # peers one catch-up asks
CATCHUP_FIRST_GAP, CATCHUP_MAX_GAP = 2.0, 30.0  # seconds between the catch-ups of a collect that stays short
MESH_D = 6  # GossipSub's mesh degree (go-libp2p-pubsub v0.10.0 default): fewer topic peers than this (or than
            # the other members) at publish time means a mesh still forming, and the announcement goes again
HEARTBEAT_TICK = 1.0  # how often the heartbeat loop looks whether MEMBER_REFRESH passed in silence


class HivemindComm(SignedTransport):
    """SignedTransport over hivemind: the topic for announcements, membership and the clock (`book`, filled by
    the subscription), libp2p streams for payloads. `members` is the live view as last read
    (`fetch_members`); `clock_rounds` what the trusted keepers said. One collect at a time."""

    def __init__(self, node: HivemindNode, swarm: str, *, name: str = "", role: str = "trainer",
                 timeout: float = 10.0, want_peers: int = 0, sample_peers: int = 8, inline: bool = False,
                 limits: wire.Limits = wire.Limits(), own_node: bool = True, seed: int | None = None):
        super().__init__(node.identity, swarm, name=name, timeout=timeout, want_peers=want_peers, limits=limits)
        self.node = node
        self.role = role
        self.sample_peers = sample_peers
        self.inline = inline or node.net.client_mode  # nobody may be able to dial us: the topic carries small batches
        self.own_node = own_node
        self.rng = random.Random(seed)
        self.server = PayloadServer()
        self.topic = gossip.topic(swarm)  # the base topic: the clock, and everything while the swarm is one shard
        self.shards, self.all_shards = 1, False  # as the keeper's clock says (follow_shards); the keeper: all
        # Clocks are followed (and kept) from the initial peers; the round clock adds coordinator_peer when it reads.
        self.book = gossip.Book(self.peer_id, self.topic, blame=self._blame_gossip,
                                trusted={peer_id_of(m) for m in node.net.initial_peers})
        self.latencies: list[float] = []  # publish-to-delivery seconds of the last collect
        self.members: dict[str, records.Member] = {}
        self.seen_peers: dict[str, None] = Recent()  # an ordered set, bounded (identities cost nothing)
        self.silent: Counter[str] = RecentCounter()  # collects in a row each expected member delivered nothing in
        self.position = {"round": -1, "stage": 0, "finished": -1}
        self.paused = False
        self.published = 0  # topic messages and bytes this peer sent
        self.published_bytes = 0
        self.heartbeats = 0  # of which separate heartbeats, and announcements sent again
        self.republished = 0
        self._said_at = float("-inf")  # monotonic time of the last message that carried our heartbeat fields
        self.pulls = 0  # payload pulls started, and catch-up requests sent
        self.catchups = 0
        self._closed = False
        node.call(node.p2p.add_binary_stream_handler(PROTOCOL, self.server.handle), timeout=30)
        node.call(node.p2p.add_binary_stream_handler(
            gossip.CATCHUP, lambda i, r, w: gossip.serve_catchup(self.book, r, w, self.rng, requester_of(i))),
            timeout=30)
        self.subscriptions: dict[str, Subscription] = {}
        self._gone_counts: Counter[str] = Counter()  # what closed subscriptions received and dropped
        node.call(self._subscribe({self.topic}), timeout=30)
        node.call(self._heartbeat(), timeout=30)
        if node.net.initial_peers:  # members and the clock now, not within the next heartbeat period
            node.call(self._catch_up(-1, 0, [peer_id_of(m) for m in node.net.initial_peers]), timeout=30)
        self._refresher = node.spawn(self._heartbeat_loop())

    # ---- the topic --------------------------------------------------------------------------------------
    async def _on_message(self, msg: Any) -> None:
        self.book.handle(msg)

    async def _publish(self, data: bytes, topic: str | None = None) -> None:
        """On `topic`, by default this peer's shard's (the base topic while the swarm is one shard)."""
        await publish(self.node.p2p, topic or self.shard_topic, data)
        self.published += 1
        self.published_bytes += len(data)

    def _blame_gossip(self, author: str, reason: str) -> None:
        """A topic message its author signed but that broke a rule: counted under the author, and a strike
        (the overall count is in book.drops)."""
        self.per_peer[author][f"dropped_gossip_{reason}"] += 1
        self.ledger.offense(author, reason if reason in ("over_rate", "too_large", "bad_signature", "relay_limit")
                            else "malformed")

    # ---- topic shards ---------------------------------------------------------------------------------------
    @property
    def shard(self) -> int:
        return gossip.shard_of(self.peer_id, self.shards)

    @property
    def shard_topic(self) -> str:
        return gossip.topic(self.swarm, self.shards, self.shard)

    def in_my_shard(self, peer: str) -> bool:
        """Whether `peer` announces where this peer listens: its own shard, or the keeper's sample of them."""
        if self.shards <= 1:
            return True
        i = gossip.shard_of(peer, self.shards)
        return i < self.listened_shards if self.all_shards else i == self.shard

    @property
    def listened_shards(self) -> int:
        """How many shards the keeper listens to (0 .. this - 1): all of them up to KEEPER_SHARDS, a sample
        beyond, so that its load too stays bounded (its quorum is a fraction, which a sample estimates)."""
        return min(self.shards, gossip.KEEPER_SHARDS)

    def _wanted_topics(self) -> set[str]:
        if self.all_shards and self.shards > 1:
            return {self.topic} | {gossip.topic(self.swarm, self.shards, i) for i in range(self.listened_shards)}
        return {self.topic, self.shard_topic}

    async def _subscribe(self, topics: set[str]) -> None:
        for t in sorted(topics - self.subscriptions.keys()):
            self.subscriptions[t] = await Subscription(self.node.p2p, t, self._on_message,
                                                       priority=self.book.priority).start()

    def _unsubscribe(self, topics: list[str]) -> None:
        for t in topics:
            sub = self.subscriptions.pop(t, None)
            if sub is not None:
                self._gone_counts["received"] += sub.received
                self._gone_counts.update({f"dropped_{k}": v for k, v in sub.dropped.items()})
                sub.close()

    def follow_shards(self, shards: int | None, *, all_shards: bool | None = None) -> None:
        """Announce and heartbeat in this peer's shard of `shards` (what the keeper's clock says; None: no
        word, stay), and listen there (`all_shards`: in the keeper's sample of shards, for its quorum). The
        old shard is still listened to for MEMBER_TTL, so what was said there before the move arrives."""
        all_shards = self.all_shards if all_shards is None else all_shards
        if shards is None or (shards, all_shards) == (self.shards, self.all_shards) or self._closed:
            return
        try:
            self.node.call(self._follow(shards, all_shards), timeout=30)
        except Exception as e:  # noqa: BLE001 - our own daemon: the next clock read tries again
            log.warning("could not move to topic shard %d of %d: %s: %s", gossip.shard_of(self.peer_id, shards),
                        shards, type(e).__name__, e)

    async def _follow(self, shards: int, all_shards: bool) -> None:
        moved = gossip.topic(self.swarm, shards, gossip.shard_of(self.peer_id, shards)) != self.shard_topic
        before = (self.shards, self.all_shards)
        self.shards, self.all_shards = shards, all_shards
        try:
            await self._subscribe(self._wanted_topics())
        except BaseException:
            self.shards, self.all_shards = before
            raise
        self.node.spawn(self._unsubscribe_later())
        if moved:
            await self._heartbeat()  # the new shard-mates hear of this peer now, not within MEMBER_REFRESH
        log.info("the swarm's topic is in %d shard(s): %s", shards,
                 f"listening to {self.listened_shards} of them" if all_shards and shards > 1
                 else f"this peer is in shard {self.shard}")

    async def _unsubscribe_later(self) -> None:
        await asyncio.sleep(gossip.MEMBER_TTL)
        if not self._closed:
            self._unsubscribe([t for t in self.subscriptions if t not in self._wanted_topics()])

    async def _catch_up(self, round: int, stage: int, peers: list[str]) -> int:
        """Ask `peers` (at most CATCHUP_PEERS, at random) what they heard; the messages taken."""
        peers = [p for p in dict.fromkeys(peers) if p and p != self.peer_id]
        peers = self.rng.sample(peers, min(CATCHUP_PEERS, len(peers)))
        if not peers:
            return 0
        self.catchups += 1
        replies = await asyncio.gather(*(gossip.ask_catchup(self.node.p2p, p, round, stage) for p in peers))
        return sum(1 for p, msgs in zip(peers, replies) for m in msgs if self.book.handle(m, via=p))

    # ---- membership -------------------------------------------------------------------------------------
    def _member_fields(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "bridged": self.bridged, "paused": self.paused, **self.position}

    async def _heartbeat(self, left: bool = False) -> None:
        await self._publish(gossip.heartbeat(left=left, **self._member_fields()))
        self._said_at = time.monotonic()
        self.heartbeats += 1

    def _quiet_for(self) -> float:
        return time.monotonic() - self._said_at

    async def _heartbeat_loop(self) -> None:
        """A heartbeat only when nothing that carries one (an own announcement, or a heartbeat sent at a
        change) went out for MEMBER_REFRESH: a peer that announces every few seconds sends none."""
        while not self._closed:
            await asyncio.sleep(max(0.05, min(HEARTBEAT_TICK, gossip.MEMBER_REFRESH - self._quiet_for())))
            if self._closed:
                break
            if self._quiet_for() < gossip.MEMBER_REFRESH:
                continue
            try:
                await self._heartbeat()
            except Exception as e:  # noqa: BLE001 - the next tick tries again
                log.debug("heartbeat failed: %s", e)

    async def fetch_members(self) -> dict[str, records.Member]:
        """Members of this swarm heard within MEMBER_TTL who have not left (self included): what the topic
        said, no network round trip."""
        members = self.book.live_members()
        for p in self.book.members:
            if p != self.peer_id:
                self.seen_peers[p] = None
        self.names.update({p: m.name for p, m in self.book.members.items()})  # kept after they leave, for the counters
        self.members = members
        for p in [p for p in self.silent if p not in self.members]:
            del self.silent[p]  # a peer that left (or died) and comes back is waited for again
        return self.members

    def clock_rounds(self, trusted: set[str]) -> list[int]:
        return self.book.clock_rounds(trusted)

    def live_trainers(self) -> set[str]:
        """Other members that train and play now (a paused one is waited for by nobody)."""
        return {p for p, m in self.members.items()
                if m.role == "trainer" and not m.paused and p != self.peer_id and self.in_my_shard(p)}

    def live_peers(self) -> set[str]:
        return self.live_trainers()

    def set_paused(self, paused: bool) -> None:
        changed = paused != self.paused
        self.paused = paused
        self._say(changed)

    def set_position(self, **fields: int) -> None:
        """Update this peer's heartbeat (round, stage, finished). A new finished round goes out at once (the
        keeper's quorum and peers holding for this one wait on it); a new round or stage travels in the
        next announcement, or the next heartbeat when nothing went out for MEMBER_REFRESH."""
        urgent = "finished" in fields and fields["finished"] != self.position["finished"]
        self.position.update(fields)
        self._say(urgent)

    def _say(self, urgent: bool) -> None:
        if not urgent and self._quiet_for() < gossip.MEMBER_REFRESH:
            return
        try:
            self.node.call(self._heartbeat(), timeout=10)
        except Exception as e:  # noqa: BLE001 - the heartbeat loop will carry it
            log.debug("member update failed: %s", e)

    # ---- publish ----------------------------------------------------------------------------------------
    def publish(self, round: int, stage: int, groups: list[Group]) -> None:
        data = self.encode(round, stage, groups)
        self.server.put(round, stage, data)
        self.position.update(round=round, stage=stage)
        signal = sum(1 for g in groups if len(set(g.rewards or [])) > 1)
        inline = data if self.inline and len(data) <= gossip.MAX_INLINE - 1024 else b""
        msg = gossip.announcement(round, stage, hashlib.sha256(data).digest(), len(data), groups=len(groups),
                                  signal=signal, data=inline, member=self._member_fields())
        try:
            self.node.call(self._announce(msg, own=True), timeout=30)
        except Exception as e:  # noqa: BLE001 - the round goes on; peers that saw nothing train without us
            log.warning("could not announce round %d stage %d: %s: %s", round, stage, type(e).__name__, e)
            return
        self.count_sent(data)

    def relay(self, round: int, stage: int, origin: str, data: bytes) -> None:
        """Serve and announce another peer's signed payload (a bridge from the Drive side); receivers check
        its signature against `origin`, so a bridge can pass payloads on but cannot alter them."""
        self.server.put(round, stage, data, origin)
        msg = gossip.announcement(round, stage, hashlib.sha256(data).digest(), len(data), origin=origin)
        try:
            self.node.call(self._announce(msg, heartbeat=False), timeout=30)
        except Exception as e:  # noqa: BLE001
            log.warning("could not relay %s's round %d stage %d: %s: %s", origin[-8:], round, stage, type(e).__name__, e)
            return
        self.relayed += 1

    async def _announce(self, msg: bytes, heartbeat: bool = True, *, own: bool = False) -> None:
        """Publish an announcement. `own`: it carries this peer's heartbeat fields (publish), so it counts
        as the heartbeat; else a heartbeat goes beside it unless `heartbeat` is False (a relay)."""
        sends = [self._publish(msg)] + ([self._heartbeat()] if heartbeat and not own else [])
        await asyncio.gather(*sends)
        if own:
            self._said_at = time.monotonic()
        self.node.spawn(self._republish(msg))  # off the publish's path: it asks our daemon first

    async def _mesh_short(self) -> bool:
        """Whether the topic has fewer peers than the mesh wants (MESH_D, or every other live member when
        fewer): a mesh still forming, in which a message may reach nobody beyond the peers it has."""
        others = sum(1 for p in self.book.live_members() if p != self.peer_id and self.in_my_shard(p))
        try:
            return len(await topic_peers(self.node.p2p, self.shard_topic, timeout=5)) < min(MESH_D, others)
        except Exception as e:  # noqa: BLE001 - no answer from our own daemon: send the spare to be safe
            log.debug("topic peers: %s", e)
            return True

    async def _republish(self, msg: bytes) -> None:
        """Once more at half the collect timeout, when the mesh was short at publish time: a peer that was
        not in it yet hears it then (receivers keep one announcement per author and slot). Copies lost in
        a full mesh are found by the collectors' catch-up instead, which costs the topic nothing."""
        if not await self._mesh_short():
            return
        await asyncio.sleep(self.timeout / 2)
        if not self._closed:
            try:
                await self._publish(msg)
                self.republished += 1
            except Exception as e:  # noqa: BLE001 - the first copy went out; this one is a spare
                log.debug("re-publish failed: %s", e)

    # ---- collect ----------------------------------------------------------------------------------------
    def serve_last_round(self, round: int, stop: threading.Event) -> None:
        """Peers pull a batch from its author: leaving right after the last round would take round `round`'s
        batches from the peers still collecting it, who would each wait out their collect timeout without
        them. So this keeps serving until no live trainer of this shard is playing `round` (or about to: it
        finished the round before), at most collect_timeout; peers further behind are not waited for."""
        deadline = time.monotonic() + self.timeout
        said = False
        while not stop.is_set() and not self._closed and self.node.alive():
            try:
                self.node.call(self.fetch_members(), timeout=5)
            except Exception as e:  # noqa: BLE001 - our own p2p side is going: nothing left to serve
                log.debug("serving the last round: %s", e)
                return
            playing = [p for p in self.live_trainers() if p in self.members
                       and self.members[p].finished < round <= max(self.members[p].round, self.members[p].finished + 1)]
            left = deadline - time.monotonic()
            if not playing or left <= 0:
                return
            if not said:
                log.info("serving round %d's batches while %d peer(s) still play it (at most %.0f s; Ctrl-C leaves now)",
                         round, len(playing), left)
                said = True
            stop.wait(min(0.2, left))

    def collect(self, round: int, stage: int) -> list[Group]:
        t0 = self.begin_collect(round)
        self.node.loop.call_soon_threadsafe(self.book.playing, round)  # what is KEEP_ROUNDS older goes
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
        t0 = loop.time()
        deadline = t0 + self.timeout
        cutoff = t0 + min(2.0, self.timeout / 4)  # the first draw of a swarm larger than K waits for this
        self.latencies = []
        valid: set[str] = set()  # signers whose batch was accepted
        failed: set[str] = set()  # signers whose own (direct) payload failed this round
        groups: list[Group] = []
        pending: set[asyncio.Task] = set()
        direct: dict[str, records.Announcement] = {}  # each signer's own announcement
        tried: set[str] = set()  # signers drawn (pulled, directly or through a relay)
        retried: set[tuple[str, str]] = set()  # (server, signer) pulled a second time
        relay_tried: set[tuple[str, str]] = set()  # (relaying peer, origin)
        relays_by: dict[str, set[str]] = {}  # distinct origins each peer claimed to relay this collect
        refused: set[tuple[str, str, str]] = set()  # (peer, origin, reason) already counted
        expected: set[str] = set()
        next_catchup, catchup_gap = cutoff, CATCHUP_FIRST_GAP
        catchup: asyncio.Task | None = None
        limit = max(self.sample_peers, self.want_peers) if self.sample_peers > 0 else 0  # pulls at once; 0: all

        def refuse(peer: str, origin: str, reason: str) -> None:
            if (peer, origin, reason) not in refused:  # the same announcement is looked at on every pass
                refused.add((peer, origin, reason))
                self.drop(peer, reason)

        def start(a: records.Announcement) -> None:
            self.pulls += 1
            pending.add(asyncio.create_task(self._fetch(a, round, stage, deadline)))

        while True:
            await self.fetch_members()
            # Candidates by signer: its own announcement, else one relay of it (origins' own copies first: a
            # relay claim never pre-empts or replaces the origin's announcement).
            candidates: dict[str, records.Announcement] = {}
            for a in sorted(self.book.announcements(round, stage), key=lambda a: a.origin is not None):
                server = a.peer_id
                if server == self.peer_id or a.signer == self.peer_id:
                    continue
                if self.ledger.banned(server):
                    refuse(server, a.signer, "banned")
                    continue
                if a.origin is None:
                    direct[server] = a
                    if server not in tried:
                        candidates[server] = a
                    continue
                origin = a.origin
                if origin in direct:  # the origin serves it itself: a relay must be of exactly that batch
                    if direct[origin].digest != a.digest:
                        refuse(server, origin, "relay_mismatch")
                    continue
                claimed = relays_by.setdefault(server, set())
                if origin not in claimed:
                    if len(claimed) >= self.relay_cap(server):
                        refuse(server, origin, "relay_limit")  # invented origins flooding through one peer
                        continue
                    claimed.add(origin)
                if origin in valid or origin in tried or origin in candidates or (server, origin) in relay_tried:
                    continue
                candidates[origin] = a
            expected = self.expected_peers(round)
            bridged = sum(min(self.members[p].bridged, self.relay_cap(p)) for p in expected
                          if p in self.members and self.per_peer[p]["relays"] > 0)  # bridges that relayed before
            need = collect_need(want_peers=self.want_peers, live=len(expected), bridged=bridged,
                                failed=len(failed & expected), sample=self.sample_peers)
            now = loop.time()
            in_flight = len(pending)
            # Draw now when everyone expected can be pulled anyway (a swarm no larger than K: no bias, no
            # wait) or every expected peer has announced (the pool is complete), else at the cutoff from all
            # heard by then; later only to replace failures or to take in announcements that came late.
            small = limit == 0 or len(expected) + bridged <= limit or expected <= direct.keys()
            if candidates and (small or now >= cutoff):
                slots = len(candidates) if limit == 0 else limit - len(valid) - in_flight
                good = {p for p, c in self.per_peer.items() if c["batches"] > 0}
                for signer in sample_sources(candidates, slots, good=good, rng=self.rng) if slots > 0 else []:
                    a = candidates[signer]
                    tried.add(signer)
                    if a.origin is not None:
                        relay_tried.add((a.peer_id, signer))
                    start(a)
            # Short of what ends the collect with no pull in flight to make it up, past the cutoff: announcements
            # were lost or went out before we joined (a relay's too, which no heartbeat mentions). Ask a few
            # peers what they heard; again after a doubling pause while still short (a catch-up can miss too).
            in_flight_pulls = len(pending) - (catchup in pending)
            if (now >= next_catchup and len(valid) + in_flight_pulls < need and (catchup is None or catchup.done())
                    and any(p != self.peer_id for p in self.members)):
                catchup = asyncio.create_task(self._catch_up(round, stage, list(self.members)))
                pending.add(catchup)
                next_catchup, catchup_gap = now + catchup_gap, min(2 * catchup_gap, CATCHUP_MAX_GAP)
            remaining = deadline - now
            # With nobody expected (need 0), pulls already in flight still finish: an announcer that is not
            # (yet) in our member view is a peer too.
            if remaining <= 0 or (len(valid) >= need and (need > 0 or not pending)):
                break
            self.book.changed.clear()
            waiter = asyncio.create_task(self.book.changed.wait())
            wake = min(remaining, max(0.01, cutoff - now)) if not small and now < cutoff else remaining
            done, _ = await asyncio.wait(pending | {waiter}, timeout=min(wake, 0.5), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in done - {waiter}:
                pending.discard(task)
                result = task.result()
                if isinstance(result, int):  # a catch-up: what it brought is in the book now
                    continue
                a, batch, retry = result
                if batch is not None:
                    valid.add(a.signer)
                    groups.extend(batch.groups)
                elif retry and (a.peer_id, a.signer) not in retried and deadline - loop.time() > 0.5:
                    retried.add((a.peer_id, a.signer))  # a reset stream or a peer busy for a moment: once more
                    start(a)
                elif a.origin is not None:
                    tried.discard(a.signer)  # another relay, or the origin itself, may still come
                else:
                    failed.add(a.signer)  # its slot goes to a fresh draw on the next pass
        for task in pending:
            task.cancel()
        for p in expected - valid:  # a member that never delivers stops being waited for (it is still pulled)
            self.silent[p] += 1
        for p in valid:  # ... until it delivers again, waited for or not
            self.silent.pop(p, None)
        # Peers with valid batches here: their topic messages go first and are held longest (gossip.Book).
        self.book.vouch(p for p, c in list(self.per_peer.items()) if c["batches"] > 0)
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
        data = a.data or self.book.inline_data(a)  # a small batch that came on the topic itself (digest checked)
        try:
            if not data:
                data = await pull(self.node.p2p, server, round, stage, max_bytes=self.limits.max_bytes,
                                  timeout=max(0.5, remaining), origin=a.origin)
                self.per_peer[server]["pulled_bytes"] += len(data)
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
            # per-peer cost of the exchange (bench/swarm_exchange.py reads these)
            "gossip_sent": self.published, "gossip_bytes_sent": self.published_bytes,
            "gossip_heartbeats": self.heartbeats, "gossip_republished": self.republished,
            "gossip_received": self._gone_counts["received"] + sum(s.received for s in self.subscriptions.values()),
            "gossip_bytes_in": self.book.bytes_in, "gossip_shards": self.shards,
            "pulls": self.pulls, "catchups": self.catchups,
        }
        rejected = self.node.validator.rejected + self.book.drops
        rejected += Counter({f"pull_{k}": v for k, v in self.server.gate.drops.items()})  # serving: busy, over rate...
        rejected += Counter({f"catchup_{k}": v for k, v in self.book.gate.drops.items()})
        for sub in self.subscriptions.values():
            rejected += sub.dropped
        out.update({f"dropped_{k}": v for k, v in rejected.items()})
        for k, v in self._gone_counts.items():
            if k.startswith("dropped_"):
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._refresher.cancel()
        if self.node.alive():  # p2pd gone (Ctrl-C reaches it too): nobody to tell
            try:
                self.node.call(asyncio.wait_for(self._heartbeat(left=True), 2), timeout=3)
            except Exception as e:  # noqa: BLE001
                log.debug("leaving: %s", e)
        self.node.loop.call_soon_threadsafe(self._unsubscribe, list(self.subscriptions))
        self.run_close_callbacks()
        if self.own_node:
            self.node.close()

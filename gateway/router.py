"""Which replica serves a request: the lowest cost of prefill left plus load, within a share.

The replica table is re-read from Redis in the background (never per token); each request
costs at most one Redis pipeline, to ask which replicas hold its prompt's leading blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from gateway.replica_link import ReplicaLink
from meshserve.internal.v1 import scheduler_pb2_grpc
from services.registry import Registry, ReplicaRecord
from services.registry.block_hash import extra_key, prefix_block_hashes

log = logging.getLogger("meshserve.gateway")

SUSPECT_S = 10.0  # a replica that failed a call is avoided this long
# A replica whose record is gone from a listing is kept this long before it is dropped: a Redis
# that restarted empty lists nothing until the next heartbeats (every TTL / 3, about 1.7 s).
# Replicas that leave on purpose drain first (out of routing at once, their streams finishing);
# a crashed one fails its calls, which marks it suspect, long before this runs out.
MISSING_GRACE_S = 5.0
POLICIES = ("prefix", "least-load", "round-robin")
# How long a gateway counts the blocks of a prompt it sent as held by that replica: until the
# replica's heartbeats (every TTL / 3) have put them in the index, with room to spare.
RECENT_S = 5.0
MAX_RECENT_BLOCKS = 65536  # per replica: the oldest go first
BALANCE_WINDOW = 32  # the last requests this gateway routed by prefix, over which shares count


@dataclass
class ReplicaHandle:
    record: ReplicaRecord
    stub: scheduler_pb2_grpc.SchedulerStub
    channel: grpc.aio.Channel
    link: ReplicaLink  # the one SubmitMany stream every request to it shares
    num_inflight: int = 0  # this gateway's requests on it now
    num_sent_since_beat: int = 0  # this gateway's running requests its record does not show
    beat: int = 0  # how many of its heartbeats this gateway has seen
    # Prompt blocks this gateway sent there lately -> until when it counts them as held.
    recent_blocks: OrderedDict[int, float] = field(default_factory=OrderedDict)
    suspect_until: float = 0.0
    missing_since: float | None = None  # when a listing last lacked its record

    async def close(self, grace: float | None = None) -> None:
        await self.link.close()
        await self.channel.close(grace)

    def started(self) -> int:
        """One of this gateway's requests goes there; returns the beat it went in."""
        self.num_inflight += 1
        self.num_sent_since_beat += 1
        return self.beat

    def ended(self, beat: int) -> None:
        self.num_inflight -= 1
        if beat == self.beat:  # no heartbeat counted it: it stops counting as it ends
            self.num_sent_since_beat -= 1

    @property
    def load(self) -> int:
        """Requests the replica has: running and waiting at its last heartbeat, plus what this
        gateway sent it since (other gateways' show at the next heartbeat)."""
        return self.record.num_running + self.record.num_waiting + self.num_sent_since_beat


@dataclass
class Router:
    registry: Registry
    refresh_period_s: float = 0.5
    replicas: dict[str, ReplicaHandle] = field(default_factory=dict)
    on_update: Callable[[], None] | None = None  # called after each refresh of the table
    on_pick: Callable[[str], None] | None = None  # called with why: prefix, load or only
    on_redis_error: Callable[[str], None] | None = None  # called with the failed operation
    policy: str = "prefix"  # one of POLICIES (see pick)
    prefix_weight: float = 1.0  # cost of one prompt block a replica would still prefill
    load_weight: float = 8.0  # cost of one request a replica has, in prompt blocks
    # Under the prefix policy a replica that took more than this multiple of an even share of
    # the last BALANCE_WINDOW requests takes none until it falls back (0 = no limit): a hot
    # prefix then spreads to a second replica instead of queueing on one.
    balance_share: float = 2.0
    _recent_picks: deque = field(default_factory=lambda: deque(maxlen=BALANCE_WINDOW))
    _turns: itertools.count = field(default_factory=itertools.count)
    _random: random.Random = field(default_factory=random.Random)
    _task: asyncio.Task | None = None
    _first: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for handle in self.replicas.values():
            await handle.close()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                self._update(await self.registry.list_replicas())
                if self.on_update is not None:
                    self.on_update()
            except Exception as exc:  # keep the last table while Redis is away
                log.warning("replica refresh failed: %s", exc)
                if self.on_redis_error is not None:
                    self.on_redis_error("list_replicas")
            self._first.set()
            await asyncio.sleep(self.refresh_period_s)

    def _update(self, records: list[ReplicaRecord]) -> None:
        """The table from a listing. A draining replica stays in it, out of routing, so the
        streams it is finishing keep their link; a replica whose record is gone (it left, it
        crashed, or Redis lost it) is dropped only after MISSING_GRACE_S."""
        now = time.monotonic()
        listed = {r.replica_id: r for r in records}
        for rid in set(self.replicas) - set(listed):
            handle = self.replicas[rid]
            handle.missing_since = handle.missing_since or now
            if now - handle.missing_since >= MISSING_GRACE_S:
                del self.replicas[rid]
                asyncio.ensure_future(handle.close(grace=30.0))
        for rid, record in listed.items():
            handle = self.replicas.get(rid)
            if handle is not None and handle.record.address == record.address:
                if record.updated_at != handle.record.updated_at:  # a new heartbeat counted ours
                    handle.beat += 1
                    handle.num_sent_since_beat = 0
                handle.record, handle.missing_since = record, None
                continue
            if handle is not None:  # the same replica id at a new address: a restart
                asyncio.ensure_future(handle.close(grace=30.0))
            elif record.draining:
                continue  # nothing of this gateway's runs there, and nothing will
            channel = grpc.aio.insecure_channel(record.address)
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            self.replicas[rid] = ReplicaHandle(record, stub, channel, ReplicaLink(stub))

    async def wait_ready(self, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self._first.wait(), timeout_s)

    def serving(self, model: str) -> list[ReplicaHandle]:
        """Replicas of model that take requests now (live, not draining, not suspect)."""
        now = time.monotonic()
        return [h for h in self.replicas.values()
                if h.record.model == model and not h.record.draining and h.suspect_until <= now]

    async def pick(self, model: str, prompt_ids: list[int], cache_salt: str,
                   exclude: set[str]) -> ReplicaHandle | None:
        """The replica for a request, by the policy:

        prefix (default): the lowest cost, prefix_weight x the prompt blocks it would still
            prefill (those past its cached prefix) + load_weight x the requests it has; a long
            cached prefix behind a full queue loses to an idle replica; a replica past its
            share of recent requests (balance_share) loses to the cheapest of the others;
        least-load: the fewest requests; round-robin: each in turn.
        Ties go to a random one of the tied."""
        candidates = [h for h in self.serving(model) if h.record.replica_id not in exclude]
        if len(candidates) <= 1:
            self._picked("only" if candidates else None)
            return candidates[0] if candidates else None
        if self.policy == "round-robin":
            candidates.sort(key=lambda h: h.record.replica_id)
            self._picked("round_robin")
            return candidates[next(self._turns) % len(candidates)]
        if self.policy == "least-load":
            self._picked("load")
            return self._cheapest(candidates, {h.record.replica_id: h.load for h in candidates})
        hashes = prefix_block_hashes(prompt_ids, candidates[0].record.block_size,
                                     extra_key(model, cache_salt))
        hits = await self._prefix_hits(candidates, hashes)
        costs = {h.record.replica_id: self.prefix_weight * (len(hashes) - hits.get(
            h.record.replica_id, 0)) + self.load_weight * h.load for h in candidates}
        best = self._cheapest(candidates, costs)
        reason = "prefix" if hits.get(best.record.replica_id, 0) else "load"
        over = self._over_share(len(candidates))
        if best.record.replica_id in over:
            others = [h for h in candidates if h.record.replica_id not in over]
            if others:
                best, reason = self._cheapest(others, costs), "balance"
        self._recent_picks.append(best.record.replica_id)
        self._remember(best, hashes)
        self._picked(reason)
        return best

    def _over_share(self, num_candidates: int) -> set[str]:
        """Replicas that took more than balance_share x an even share of the last
        BALANCE_WINDOW prefix-routed requests (none until that many were routed)."""
        picks = self._recent_picks
        if not self.balance_share or len(picks) < BALANCE_WINDOW:
            return set()
        limit = self.balance_share * len(picks) / num_candidates
        return {rid for rid, n in Counter(picks).items() if n > limit}

    def _cheapest(self, candidates: list[ReplicaHandle], costs: dict[str, float]):
        lowest = min(costs[h.record.replica_id] for h in candidates)
        return self._random.choice([h for h in candidates
                                    if costs[h.record.replica_id] == lowest])

    def _picked(self, reason: str | None) -> None:
        if reason is not None and self.on_pick is not None:
            self.on_pick(reason)

    async def _prefix_hits(self, candidates, hashes: list[int]) -> dict[str, int]:
        """Leading blocks of the prompt each candidate holds: what the Redis index says, or
        what this gateway sent there lately, if more (the index learns of a replica's new
        blocks at its next heartbeat: a burst of one prefix would otherwise scatter)."""
        if not hashes:
            return {}
        try:
            hits = await self.registry.longest_prefix(
                [h.record.replica_id for h in candidates], hashes)
        except Exception as exc:  # routing by load alone is still correct
            log.warning("prefix lookup failed: %s", exc)
            if self.on_redis_error is not None:
                self.on_redis_error("longest_prefix")
            hits = {}
        now = time.monotonic()
        for h in candidates:
            sent = h.recent_blocks
            held = next((i for i, b in enumerate(hashes) if sent.get(b, 0.0) < now), len(hashes))
            if held > hits.get(h.record.replica_id, 0):
                hits[h.record.replica_id] = held
        return hits

    def _remember(self, handle: ReplicaHandle, hashes: list[int]) -> None:
        """The replica will hold these blocks once it ran the prompt: for RECENT_S."""
        recent, until = handle.recent_blocks, time.monotonic() + RECENT_S
        for block_hash in hashes:
            recent[block_hash] = until
            recent.move_to_end(block_hash)
        while len(recent) > MAX_RECENT_BLOCKS:
            recent.popitem(last=False)

    def mark_suspect(self, handle: ReplicaHandle) -> None:
        handle.suspect_until = time.monotonic() + SUSPECT_S

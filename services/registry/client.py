"""The async registry client that schedulers write through and gateways read through.

Keys and their meaning are in `schema.py`. Each method is one round trip (one pipeline), except
`set_draining`, an optimistic read-modify-write. None of them belongs on the per-token path:
schedulers heartbeat on a timer and publish prefix changes in batches.

    registry = Registry("redis://127.0.0.1:6379/0", ttl_s=5.0)
    await registry.register(record)                          # scheduler, once at start-up
    await registry.publish_prefix(rid, added=[h1, h2], removed=[])
    if not (await registry.heartbeat(record)).was_live:      # every ~ttl_s / 3
        ...                                                  # had expired: republish all hashes
    live = await registry.list_replicas()                    # gateway
    hits = await registry.longest_prefix([r.replica_id for r in live], prompt_block_hashes)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from services.registry.schema import (
    DEFAULT_NAMESPACE,
    DEFAULT_TTL_S,
    ReplicaRecord,
    encode_block_hash,
    prefix_key,
    replica_key,
    replica_key_pattern,
)

log = logging.getLogger(__name__)

_MAX_MEMBERS_PER_COMMAND = 10_000  # keeps one SADD/SREM well under Redis' argument limits


# Compare-and-delete in one step, so a claim is only ever released by its owner.
_DELETE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """What a heartbeat found. was_live False: the record had expired (or was never
    registered), and the prefix set may be gone with it: republish every hash held.
    drain_requested: the record said draining (`meshserve drain`, via set_draining)."""

    was_live: bool
    drain_requested: bool


class Registry:
    """Replica records with a TTL, and each replica's set of cached prefix-block hashes."""

    def __init__(self, url: str, namespace: str = DEFAULT_NAMESPACE, ttl_s: float = DEFAULT_TTL_S,
                 *, socket_timeout_s: float = 5.0):
        if ttl_s <= 0:
            raise ValueError(f"registry ttl_s must be > 0 seconds, got {ttl_s}")
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True,
            socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)

    async def __aenter__(self) -> "Registry":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._redis.aclose()

    # -- writers: gateways, per request (never per token) ------------------------------------------

    async def claim_request(self, request_id: str, owner: str, ttl_s: float) -> bool:
        """Marks a client-chosen request id as running; False if it already is (anywhere)."""
        key = f"{self.namespace}:request:{request_id}"
        return bool(await self._redis.set(key, owner, nx=True, px=max(1, round(ttl_s * 1000))))

    async def release_request(self, request_id: str, owner: str) -> None:
        """Ends a claim made by owner (a claim that expired and was taken by another stays)."""
        key = f"{self.namespace}:request:{request_id}"
        await self._redis.eval(_DELETE_IF_OWNER, 1, key, owner)

    # -- writers: the replica's scheduler ---------------------------------------------------------

    async def register(self, record: ReplicaRecord) -> None:
        """Announce a replica that starts with an empty prefix cache: writes its record and drops
        any prefix set left by an earlier process with the same id."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._replica_key(record.replica_id), self._stamped(record), px=self._ttl_ms)
            pipe.delete(self._prefix_key(record.replica_id))
            await pipe.execute()

    async def heartbeat(self, record: ReplicaRecord) -> Heartbeat:
        """Rewrite the record and reset the TTL of the record and the prefix set; say what the
        record was (see Heartbeat)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._replica_key(record.replica_id), self._stamped(record),
                     px=self._ttl_ms, get=True)
            pipe.pexpire(self._prefix_key(record.replica_id), self._ttl_ms)
            previous, _ = await pipe.execute()
        if previous is None:
            return Heartbeat(was_live=False, drain_requested=False)
        return Heartbeat(was_live=True,
                         drain_requested=ReplicaRecord.from_json(previous).draining)

    async def deregister(self, replica_id: str) -> None:
        """Clean shutdown: the record and the prefix set go at once, not after the TTL."""
        await self._redis.delete(self._replica_key(replica_id), self._prefix_key(replica_id))

    async def set_draining(self, replica_id: str, draining: bool) -> bool:
        """Flip the record's `draining` flag, keeping its TTL. Returns False if the replica is not
        live. The replica's own heartbeats rewrite the whole record, so a draining replica must
        also heartbeat with `draining=True`."""
        key = self._replica_key(replica_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    text = await pipe.get(key)
                    if text is None:
                        await pipe.unwatch()
                        return False
                    record = dataclasses.replace(ReplicaRecord.from_json(text), draining=draining)
                    pipe.multi()
                    pipe.set(key, record.to_json(), keepttl=True, xx=True)
                    await pipe.execute()
                    return True
                except WatchError:  # a heartbeat landed in between: read it again
                    continue

    async def publish_prefix(self, replica_id: str, added: Sequence[int],
                             removed: Sequence[int]) -> None:
        """Apply a batch of prefix-cache changes (net: a hash may not be in both lists) and reset
        the prefix set's TTL."""
        added_members = [encode_block_hash(h) for h in added]
        removed_members = [encode_block_hash(h) for h in removed]
        if both := set(added_members) & set(removed_members):
            raise ValueError(f"block hashes both added and removed in one batch: {sorted(both)[:5]}")
        key = self._prefix_key(replica_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            for chunk in _chunks(removed_members):
                pipe.srem(key, *chunk)
            for chunk in _chunks(added_members):
                pipe.sadd(key, *chunk)
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    async def replace_prefix(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Make the prefix set exactly `hashes` (after Redis lost it, or a batch of changes was
        lost on the way), in one transaction, and reset its TTL."""
        key = self._prefix_key(replica_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for chunk in _chunks([encode_block_hash(h) for h in hashes]):
                pipe.sadd(key, *chunk)
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    # -- readers: gateways --------------------------------------------------------------------------

    async def get_replica(self, replica_id: str) -> ReplicaRecord | None:
        text = await self._redis.get(self._replica_key(replica_id))
        return None if text is None else ReplicaRecord.from_json(text)

    async def list_replicas(self) -> list[ReplicaRecord]:
        """Every live replica, sorted by id; records that do not parse are logged and skipped."""
        keys = [key async for key in self._redis.scan_iter(
            match=replica_key_pattern(self.namespace), count=1000)]
        if not keys:
            return []
        records = []
        for key, text in zip(keys, await self._redis.mget(keys)):
            if text is None:  # expired between SCAN and MGET
                continue
            try:
                records.append(ReplicaRecord.from_json(text))
            except ValueError as exc:
                log.warning("skipping malformed replica record %s: %s", key, exc)
        return sorted(records, key=lambda r: r.replica_id)

    async def longest_prefix(self, replica_ids: Iterable[str],
                             block_hashes: Sequence[int]) -> dict[str, int]:
        """For each replica, how many of the leading `block_hashes` its prefix set holds.

        Hashes are chained, so a hit after the first miss is a different prefix and not counted:
        hits [h1, h2, miss, h4] count 2.
        """
        replica_ids = list(replica_ids)
        if not block_hashes or not replica_ids:
            return dict.fromkeys(replica_ids, 0)
        members = [encode_block_hash(h) for h in block_hashes]
        async with self._redis.pipeline(transaction=False) as pipe:
            for replica_id in replica_ids:
                pipe.smismember(self._prefix_key(replica_id), members)
            results = await pipe.execute()
        return {replica_id: sum(1 for _ in itertools.takewhile(bool, hits))
                for replica_id, hits in zip(replica_ids, results)}

    # -- helpers ------------------------------------------------------------------------------------

    def _replica_key(self, replica_id: str) -> str:
        return replica_key(self.namespace, replica_id)

    def _prefix_key(self, replica_id: str) -> str:
        return prefix_key(self.namespace, replica_id)

    @staticmethod
    def _stamped(record: ReplicaRecord) -> str:
        return dataclasses.replace(record, updated_at=time.time()).to_json()


def _chunks(members: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(members), _MAX_MEMBERS_PER_COMMAND):
        yield members[start:start + _MAX_MEMBERS_PER_COMMAND]

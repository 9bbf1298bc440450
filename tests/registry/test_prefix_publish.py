"""The scheduler's prefix publisher against a real redis-server: the index follows the block
manager's cache within a fraction of a second, and a lost write or a lost set is repaired whole."""

from __future__ import annotations

import asyncio

import redis

from services.registry import Registry
from services.registry.block_hash import extra_key, prefix_block_hashes
from services.registry.schema import encode_block_hash, prefix_key
from services.scheduler.block_manager import BlockManager
from services.scheduler.server import prefix_publish_loop
from tests.registry.test_registry import make_record, run_async

BS = 4
EK = extra_key("tiny-llama")


def members(url: str, replica_id: str = "r0") -> set[int]:
    with redis.Redis.from_url(url) as raw:
        return {int(m) for m in raw.smembers(prefix_key("meshserve", replica_id))}


def cache_prompt(bm: BlockManager, seq: str, tokens: list[int]) -> list[int]:
    bm.allocate_prefix(seq, tokens, EK)
    assert bm.allocate(seq, len(tokens))
    bm.commit(seq, tokens, EK)
    return prefix_block_hashes(tokens, BS, EK)


async def until(predicate, timeout_s: float = 2.0) -> float:
    """Seconds until predicate() holds (fails after timeout_s)."""
    start = asyncio.get_running_loop().time()
    while not predicate():
        assert asyncio.get_running_loop().time() - start < timeout_s, "timed out"
        await asyncio.sleep(0.02)
    return asyncio.get_running_loop().time() - start


@run_async
async def test_replace_prefix_makes_the_set_exactly_the_hashes(clean_redis):
    async with Registry(clean_redis, ttl_s=5.0) as registry:
        await registry.register(make_record("r0"))
        await registry.publish_prefix("r0", added=[1, 2, 3], removed=[])
        await registry.replace_prefix("r0", [2, 4])
        assert members(clean_redis) == {2, 4}
        with redis.Redis.from_url(clean_redis) as raw:
            assert 0 < raw.pttl(prefix_key("meshserve", "r0")) <= 5000
        await registry.replace_prefix("r0", [])
        assert members(clean_redis) == set()


@run_async
async def test_new_and_evicted_blocks_reach_the_index_within_a_publish_period(clean_redis):
    bm = BlockManager(16, BS)
    async with Registry(clean_redis, ttl_s=5.0) as registry:
        await registry.register(make_record("r0"))
        task = asyncio.create_task(prefix_publish_loop(registry, bm, "r0", asyncio.Event(),
                                                       period_s=0.1))
        try:
            cached = cache_prompt(bm, "a", list(range(12)))  # 3 full blocks
            assert await until(lambda: members(clean_redis) == set(cached)) < 0.5
            bm.free("a")
            assert bm.reset_prefix_cache()
            assert await until(lambda: members(clean_redis) == set()) < 0.5
        finally:
            task.cancel()


@run_async
async def test_a_failed_write_and_a_lost_set_are_rewritten_whole(clean_redis, monkeypatch):
    bm = BlockManager(16, BS)
    async with Registry(clean_redis, ttl_s=5.0) as registry:
        await registry.register(make_record("r0"))
        first = cache_prompt(bm, "a", list(range(8)))
        real_publish, failures = registry.publish_prefix, []

        async def publish_once_failing(*args):
            if not failures:
                failures.append(args)
                raise redis.ConnectionError("Redis away")  # the batch is drained, then lost
            await real_publish(*args)

        monkeypatch.setattr(registry, "publish_prefix", publish_once_failing)
        resync = asyncio.Event()
        task = asyncio.create_task(prefix_publish_loop(registry, bm, "r0", resync, period_s=0.1))
        try:
            await until(lambda: members(clean_redis) == set(first))  # rewritten from the cache
            assert failures
            with redis.Redis.from_url(clean_redis) as raw:  # Redis loses the set, and a stale
                raw.delete(prefix_key("meshserve", "r0"))   # member appears: the heartbeat
                raw.sadd(prefix_key("meshserve", "r0"), encode_block_hash(999))  # asks resync
            resync.set()
            await until(lambda: members(clean_redis) == set(first))
        finally:
            task.cancel()

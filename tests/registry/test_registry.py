"""The registry client against a real redis-server (the session's, flushed per test)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time

import pytest
import redis

from services.registry import Registry, ReplicaRecord
from services.registry.schema import prefix_key, replica_key

TTL_S = 0.6  # short, so that expiry tests wait about a second


def run_async(test):
    """Run an `async def` test on a fresh event loop (its fixtures stay plain arguments)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


def make_record(replica_id: str = "r0", **changes) -> ReplicaRecord:
    record = ReplicaRecord(
        replica_id=replica_id, address="10.0.0.7:50061", model="tiny-llama", tp_size=2, pp_size=2,
        block_size=16, num_kv_blocks=1024, num_free_kv_blocks=1000, num_running=3, num_waiting=1,
        draining=False, started_at=1_700_000_000.25, updated_at=0.0)
    return dataclasses.replace(record, **changes)


def test_record_json_round_trip():
    record = make_record(draining=True, updated_at=1_700_000_001.5)
    assert ReplicaRecord.from_json(record.to_json()) == record
    assert make_record(num_free_kv_blocks=256).kv_usage == 0.75


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"replica_id": "r0"}',
    make_record().to_json().replace('"tp_size":2', '"tp_size":"2"'),
    make_record().to_json().replace('"draining":false', '"draining":0'),
], ids=["not-json", "not-an-object", "missing-fields", "string-count", "int-flag"])
def test_malformed_record_raises_value_error(text):
    with pytest.raises(ValueError):
        ReplicaRecord.from_json(text)


def test_replica_id_must_be_safe_in_a_key():
    with pytest.raises(ValueError, match="replica id"):
        replica_key("meshserve", "a*b")


@run_async
async def test_register_list_deregister(clean_redis):
    async with Registry(clean_redis) as registry:
        before = time.time()
        await registry.register(make_record("r1"))
        await registry.register(make_record("r0", num_running=7))
        replicas = await registry.list_replicas()
        assert [r.replica_id for r in replicas] == ["r0", "r1"]
        assert replicas[0] == make_record("r0", num_running=7, updated_at=replicas[0].updated_at)
        assert replicas[0].updated_at >= before
        await registry.deregister("r0")
        assert [r.replica_id for r in await registry.list_replicas()] == ["r1"]
        assert await registry.get_replica("r0") is None


@run_async
async def test_namespaces_do_not_see_each_other(clean_redis):
    async with Registry(clean_redis, namespace="a") as a, Registry(clean_redis, namespace="b") as b:
        await a.register(make_record("r0"))
        assert await b.list_replicas() == []
        assert [r.replica_id for r in await a.list_replicas()] == ["r0"]


@run_async
async def test_malformed_records_are_skipped(clean_redis):
    async with Registry(clean_redis) as registry:
        await registry.register(make_record("good"))
        with redis.Redis.from_url(clean_redis) as raw:
            raw.set(replica_key("meshserve", "bad"), '{"replica_id": "bad"}')
        assert [r.replica_id for r in await registry.list_replicas()] == ["good"]


@run_async
async def test_replica_and_its_prefix_set_expire_without_heartbeats(clean_redis):
    async with Registry(clean_redis, ttl_s=TTL_S) as registry:
        await registry.register(make_record("r0"))
        await registry.publish_prefix("r0", added=[11, 12], removed=[])
        assert await registry.longest_prefix(["r0"], [11, 12]) == {"r0": 2}
        await asyncio.sleep(TTL_S + 0.3)
        assert await registry.list_replicas() == []
        assert await registry.longest_prefix(["r0"], [11, 12]) == {"r0": 0}
        with redis.Redis.from_url(clean_redis) as raw:
            assert raw.exists(replica_key("meshserve", "r0"), prefix_key("meshserve", "r0")) == 0


@run_async
async def test_heartbeats_keep_replica_and_prefix_set_alive(clean_redis):
    async with Registry(clean_redis, ttl_s=TTL_S) as registry:
        await registry.register(make_record("r0"))
        await registry.publish_prefix("r0", added=[11], removed=[])
        for _ in range(6):  # 1.2 s: twice the TTL
            await asyncio.sleep(TTL_S / 3)
            assert (await registry.heartbeat(make_record("r0", num_waiting=9))).was_live is True
        (replica,) = await registry.list_replicas()
        assert replica.num_waiting == 9
        assert await registry.longest_prefix(["r0"], [11]) == {"r0": 1}


@run_async
async def test_heartbeat_after_expiry_says_so(clean_redis):
    async with Registry(clean_redis, ttl_s=TTL_S) as registry:
        await registry.register(make_record("r0"))
        await asyncio.sleep(TTL_S + 0.3)
        assert (await registry.heartbeat(make_record("r0"))).was_live is False  # republish
        assert (await registry.heartbeat(make_record("never-registered"))).was_live is False
        assert (await registry.heartbeat(make_record("r0"))).was_live is True
        assert [r.replica_id for r in await registry.list_replicas()] == ["never-registered", "r0"]


@run_async
async def test_prefix_publish_remove_and_leading_counts(clean_redis):
    h1, h2, h3, h4 = 2**64 - 1, -5, 0, 123456789
    async with Registry(clean_redis) as registry:
        for rid in ("a", "b", "c"):
            await registry.register(make_record(rid))
        await registry.publish_prefix("a", added=[h1, h2, h4], removed=[])  # h3 missing
        await registry.publish_prefix("b", added=[h1, h2, h3, h4], removed=[])
        await registry.publish_prefix("b", added=[], removed=[h2])
        query = [h1, h2, h3, h4]
        assert await registry.longest_prefix(["a", "b", "c"], query) == {"a": 2, "b": 1, "c": 0}
        await registry.publish_prefix("a", added=[h3], removed=[h4])
        assert await registry.longest_prefix(["a"], query) == {"a": 3}
        assert await registry.longest_prefix(["a", "b"], []) == {"a": 0, "b": 0}


@run_async
async def test_publish_rejects_a_hash_both_added_and_removed(clean_redis):
    async with Registry(clean_redis) as registry:
        with pytest.raises(ValueError, match="both added and removed"):
            await registry.publish_prefix("a", added=[1, 2], removed=[2])


@run_async
async def test_register_drops_a_stale_prefix_set(clean_redis):
    async with Registry(clean_redis) as registry:
        await registry.register(make_record("r0"))
        await registry.publish_prefix("r0", added=[1, 2], removed=[])
        await registry.register(make_record("r0"))  # the replica restarted: its cache is empty
        assert await registry.longest_prefix(["r0"], [1, 2]) == {"r0": 0}


@run_async
async def test_deregister_drops_the_prefix_set(clean_redis):
    async with Registry(clean_redis) as registry:
        await registry.register(make_record("r0"))
        await registry.publish_prefix("r0", added=[1], removed=[])
        await registry.deregister("r0")
        assert await registry.longest_prefix(["r0"], [1]) == {"r0": 0}


@run_async
async def test_draining_round_trip_keeps_the_ttl(clean_redis):
    async with Registry(clean_redis, ttl_s=30) as registry:
        await registry.register(make_record("r0", num_running=4))
        assert await registry.set_draining("r0", True) is True
        record = await registry.get_replica("r0")
        assert record.draining is True and record.num_running == 4
        with redis.Redis.from_url(clean_redis) as raw:
            assert 0 < raw.pttl(replica_key("meshserve", "r0")) <= 30_000
        assert await registry.set_draining("r0", False) is True
        assert (await registry.get_replica("r0")).draining is False
        assert await registry.set_draining("gone", True) is False
        assert await registry.get_replica("gone") is None


@run_async
async def test_the_next_heartbeat_tells_the_replica_a_drain_was_asked_for(clean_redis):
    async with Registry(clean_redis, ttl_s=30) as registry:
        await registry.register(make_record("r0"))
        assert (await registry.heartbeat(make_record("r0"))).drain_requested is False
        await registry.set_draining("r0", True)  # `meshserve drain r0`
        assert (await registry.heartbeat(make_record("r0"))).drain_requested is True
        # The replica heartbeats draining from then on: the record keeps saying so.
        await registry.heartbeat(make_record("r0", draining=True))
        assert (await registry.get_replica("r0")).draining is True

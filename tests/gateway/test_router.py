"""The routing rule: longest cached prefix first, then least load; failed replicas avoided."""

from __future__ import annotations

import asyncio

from gateway.router import Router
from services.registry import ReplicaRecord
from services.registry.block_hash import extra_key, prefix_block_hashes


class FakeRegistry:
    """Pure logic under test: answers prefix lookups from a table."""

    def __init__(self, held: dict[str, int]):
        self.held = held
        self.asked: list[list[str]] = []

    async def longest_prefix(self, replica_ids, hashes):
        self.asked.append(list(replica_ids))
        return {rid: min(n, len(hashes)) for rid, n in self.held.items() if rid in replica_ids}


def record(rid: str, running: int, model: str = "m") -> ReplicaRecord:
    return ReplicaRecord(rid, f"127.0.0.1:{1000 + int(rid[-1])}", model, 1, 1, 16, 100, 100,
                         running, 0)


def route(held, records, prompt=tuple(range(40)), exclude=()):
    async def run():
        router = Router(FakeRegistry(held))
        router._update(records)
        try:
            handle = await router.pick("m", list(prompt), "", set(exclude))
            return None if handle is None else handle.record.replica_id, router
        finally:
            await router.close()

    return asyncio.run(run())


def test_longest_prefix_beats_load():
    rid, _ = route({"r1": 2, "r2": 1}, [record("r1", 9), record("r2", 0)])
    assert rid == "r1"


def test_least_load_when_no_prefix_is_cached():
    rid, _ = route({}, [record("r1", 5), record("r2", 1), record("r3", 3)])
    assert rid == "r2"


def test_tried_replicas_and_other_models_are_skipped():
    records = [record("r1", 0), record("r2", 4), record("r3", 0, model="other")]
    rid, _ = route({"r1": 2}, records, exclude={"r1"})
    assert rid == "r2"
    assert route({}, [record("r3", 0, model="other")])[0] is None


def test_a_single_candidate_needs_no_prefix_lookup():
    async def run():
        registry = FakeRegistry({})
        router = Router(registry)
        router._update([record("r1", 0)])
        handle = await router.pick("m", list(range(40)), "", set())
        await router.close()
        return handle.record.replica_id, registry.asked

    assert asyncio.run(run()) == ("r1", [])


def test_draining_replicas_take_no_new_requests():
    draining = ReplicaRecord("r1", "127.0.0.1:1001", "m", 1, 1, 16, 100, 100, 0, 0, draining=True)
    assert route({}, [draining, record("r2", 7)])[0] == "r2"


def test_the_gateway_hashes_the_chain_the_scheduler_caches():
    # Only full blocks, keyed by model and salt: 40 tokens at block size 16 -> 2 hashes.
    hashes = prefix_block_hashes(list(range(40)), 16, extra_key("m", ""))
    assert len(hashes) == 2
    assert hashes != prefix_block_hashes(list(range(40)), 16, extra_key("m", "salt"))

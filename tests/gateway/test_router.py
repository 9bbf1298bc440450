"""The routing rule: longest cached prefix first, then least load; failed replicas avoided."""

from __future__ import annotations

import asyncio
import dataclasses

from gateway import router as router_module
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


def route(held, records, prompt=tuple(range(40)), exclude=(), policy="prefix", times=1):
    """The replica ids picked for `times` requests of prompt (None where none serves)."""
    async def run():
        router = Router(FakeRegistry(held), policy=policy)
        router._update(records)
        try:
            picks = []
            for _ in range(times):
                handle = await router.pick("m", list(prompt), "", set(exclude))
                picks.append(None if handle is None else handle.record.replica_id)
            return picks if times > 1 else picks[0], router
        finally:
            await router.close()

    return asyncio.run(run())


def test_a_cached_prefix_wins_between_equally_loaded_replicas():
    rid, _ = route({"r1": 2, "r2": 1}, [record("r1", 1), record("r2", 1)])
    assert rid == "r1"


def test_a_long_cached_prefix_behind_a_full_queue_loses_to_an_idle_replica():
    prompt = tuple(range(40 * 16))  # 40 blocks, all cached on r1
    assert route({"r1": 40}, [record("r1", 9), record("r2", 0)], prompt)[0] == "r2"  # 72 > 40
    assert route({"r1": 40}, [record("r1", 2), record("r2", 0)], prompt)[0] == "r1"  # 16 < 40


def test_round_robin_takes_each_in_turn_and_least_load_the_fewest_requests():
    records = [record("r1", 3), record("r2", 1), record("r3", 1)]
    picks, _ = route({"r1": 2}, records, policy="round-robin", times=6)
    assert picks == ["r1", "r2", "r3"] * 2
    picks, _ = route({"r1": 2}, records, policy="least-load", times=40)
    assert set(picks) == {"r2", "r3"}  # tied: either, at random; never the busy one


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


def test_a_replica_missing_from_a_listing_stays_for_a_grace(monkeypatch):
    """A Redis that restarted empty lists nothing until the next heartbeats: the table holds."""
    clock = [100.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: clock[0])

    async def run():
        router = Router(FakeRegistry({}))
        router._update([record("r1", 0), record("r2", 0)])
        router._update([])  # an empty registry
        kept = sorted(router.replicas)
        clock[0] += router_module.MISSING_GRACE_S / 2
        router._update([record("r1", 0)])  # r1 heartbeats again; r2 does not
        clock[0] += router_module.MISSING_GRACE_S / 2 + 0.1
        router._update([record("r1", 0)])
        await router.close()
        return kept, sorted(router.replicas)

    assert asyncio.run(run()) == (["r1", "r2"], ["r1"])


def test_a_draining_replica_leaves_routing_at_once_but_keeps_its_link():
    """Its streams in flight finish over the link they have; no new request goes there."""
    async def run():
        router = Router(FakeRegistry({}))
        router._update([record("r1", 0), record("r2", 0)])
        link = router.replicas["r1"].link
        draining = dataclasses.replace(record("r1", 0), draining=True)
        router._update([draining, record("r2", 0)])
        serving = [h.record.replica_id for h in router.serving("m")]
        kept_link = router.replicas["r1"].link is link
        router._update([dataclasses.replace(record("r3", 0), draining=True)])  # new, draining
        await router.close()
        return serving, kept_link, "r3" in router.replicas

    assert asyncio.run(run()) == (["r2"], True, False)


def test_a_replica_load_counts_this_gateways_requests_once_and_only_while_they_run():
    async def run():
        router = Router(FakeRegistry({}))
        router._update([record("r1", 0)])
        handle = router.replicas["r1"]
        first = handle.started()
        second = handle.started()
        loads = [handle.load]  # 2: neither is in a heartbeat yet
        handle.ended(first)
        loads.append(handle.load)  # 1: the one that ended no longer counts
        beat = dataclasses.replace(record("r1", 1), updated_at=1.0)  # the heartbeat has it
        router._update([beat])
        loads.append(handle.load)  # 1: from the record, not twice
        handle.ended(second)
        loads.append(handle.load)  # 1 until the next heartbeat says otherwise
        await router.close()
        return loads

    assert asyncio.run(run()) == [2, 1, 1, 1]


def test_a_burst_of_one_prefix_stays_together_before_the_index_knows(monkeypatch):
    """The index learns of new blocks at the replica's next heartbeat; meanwhile the gateway
    remembers where it sent a prompt, for a few seconds."""
    clock = [100.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: clock[0])
    prompt = list(range(64))  # 4 blocks, cached nowhere yet

    async def run():
        router = Router(FakeRegistry({}))
        router._update([record("r1", 0), record("r2", 0), record("r3", 0)])
        burst = [(await router.pick("m", prompt, "", set())).record.replica_id
                 for _ in range(8)]
        hashes = prefix_block_hashes(prompt, 16, extra_key("m", ""))
        remembered = await router._prefix_hits(list(router.replicas.values()), hashes)
        clock[0] += router_module.RECENT_S + 0.1  # by now the index says, or the blocks went
        lapsed = await router._prefix_hits(list(router.replicas.values()), hashes)
        await router.close()
        return burst, remembered, lapsed

    burst, remembered, lapsed = asyncio.run(run())
    assert len(set(burst)) == 1
    assert remembered == {burst[0]: 4} and lapsed == {}


def test_a_hot_prefix_spreads_once_its_replica_passes_its_share():
    """Every request shares one prefix cached on r1: r1 takes them all until it holds more than
    twice an even share of the last BALANCE_WINDOW, then the cheapest other replica takes them."""
    window = router_module.BALANCE_WINDOW
    records = [record("r1", 0), record("r2", 0), record("r3", 0), record("r4", 0)]
    picks, _ = route({"r1": 3}, records, times=3 * window)
    assert picks[:window] == ["r1"] * window  # the window fills before any share counts
    tail = picks[-window:]
    assert tail.count("r1") <= 2 * window / 4 + 1  # at most 2x an even share, and no less used
    assert tail.count("r1") >= 2 * window / 4 - 1
    assert set(tail) - {"r1"}  # the rest went elsewhere


def test_without_a_share_limit_the_cached_replica_takes_every_request():
    async def run():
        router = Router(FakeRegistry({"r1": 3}), balance_share=0.0)
        router._update([record("r1", 0), record("r2", 0)])
        picks = [(await router.pick("m", list(range(40)), "", set())).record.replica_id
                 for _ in range(3 * router_module.BALANCE_WINDOW)]
        await router.close()
        return picks

    assert set(asyncio.run(run())) == {"r1"}

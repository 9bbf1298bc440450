"""Prefix caching, chunked prefill and preemption change speed, never tokens: the same workload
through the served path gives transformers' greedy output under every setting."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.registry import Registry
from services.registry.block_hash import extra_key, prefix_block_hashes
from tests.integration.conftest import hf_greedy, scheduler_stats

SHARED = [1] + [(11 * i) % 200 + 20 for i in range(40)]  # 41 tokens: 2 full blocks of 16
PROMPTS = [SHARED + [250 + i] * (i + 1) for i in range(6)] + [[1, 9, 8, 7]]
NUM_TOKENS = 24

SETTINGS = {
    "defaults": MeshSpec(port=0, worker_args=("--num-kv-blocks", "128")),
    "no prefix caching": MeshSpec(port=0, worker_args=("--num-kv-blocks", "128"),
                                  scheduler_args=("--no-prefix-caching",)),
    "chunks of 16 tokens": MeshSpec(port=0, worker_args=("--num-kv-blocks", "128"),
                                    scheduler_args=("--max-num-batched-tokens", "16")),
    "no chunked prefill": MeshSpec(port=0, worker_args=("--num-kv-blocks", "128"),
                                   scheduler_args=("--no-chunked-prefill",
                                                   "--max-num-batched-tokens", "32")),
    # 10 blocks of 16 tokens hold 160 tokens; 7 requests need up to 5 blocks each.
    "tiny KV pool": MeshSpec(port=0, worker_args=("--num-kv-blocks", "10")),
}


def run_workload(mesh: LocalMesh) -> tuple[list[list[int]], list[pb.Usage]]:
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def one(prompt):
            ids, last = [], None
            for msg in stub.Generate(pb.GenerateRequest(
                    prompt_token_ids=prompt,
                    sampling=pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)),
                    timeout=120):
                ids += msg.token_ids
                last = msg
            return ids, last.usage

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(one, PROMPTS))
    return [r[0] for r in results], [r[1] for r in results]


@pytest.fixture(scope="module")
def reference(default_model_dir):
    return [hf_greedy(default_model_dir, p, NUM_TOKENS, stop_at_eos=False) for p in PROMPTS]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_tokens_under_every_setting(name, reference):
    with LocalMesh(SETTINGS[name]) as mesh:
        first, _ = run_workload(mesh)
        again, usage = run_workload(mesh)  # the shared prefix is cached by now (when enabled)
        if name == "tiny KV pool":
            _check_too_big_for_the_pool(mesh)
        stats = scheduler_stats(mesh)
        assert stats.num_free_kv_blocks == stats.num_kv_blocks  # nothing leaked
    assert first == reference
    assert again == reference
    if name == "tiny KV pool":
        assert stats.num_preemptions > 0
    if name == "no prefix caching":
        assert all(u.cached_prompt_tokens == 0 for u in usage)
        assert stats.num_prefix_hit_tokens == 0
    elif name != "tiny KV pool":
        # Every prompt of the second round finds its full blocks cached.
        assert [u.cached_prompt_tokens for u in usage] == [
            min(len(p) - 1, 16 * (len(p) // 16)) // 16 * 16 for p in PROMPTS]


def test_cached_prefix_is_reported_and_published_to_redis(mesh, stub, default_model_dir):
    prompt = [1] + list(range(60, 110))  # 51 tokens: 3 full blocks
    first = _usage(stub, prompt)
    second = _usage(stub, prompt)
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == 48
    hashes = prefix_block_hashes(prompt, 16, extra_key("meshserve-tiny-llama"))

    async def held():
        registry = Registry(mesh.redis_url)
        try:
            return await registry.longest_prefix(["replica-0"], hashes)
        finally:
            await registry.close()

    deadline = time.monotonic() + 10  # published on the next heartbeat
    while asyncio.run(held()).get("replica-0", 0) < 3:
        assert time.monotonic() < deadline, "the prefix index never showed the cached blocks"
        time.sleep(0.2)
    # A different cache salt shares nothing.
    salted = _usage(stub, prompt, cache_salt="tenant-b")
    assert salted.cached_prompt_tokens == 0


def _usage(stub, prompt, **fields) -> pb.Usage:
    *_, last = stub.Generate(pb.GenerateRequest(
        prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=4), **fields))
    return last.usage


def _check_too_big_for_the_pool(mesh: LocalMesh) -> None:
    """11 blocks of 16 tokens fit the context (1024) but not a pool of 10 blocks."""
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
                prompt_token_ids=[1] * 8, sampling=pb.SamplingParams(max_tokens=11 * 16 - 8))))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 11 KV blocks; this replica has 10" in err.value.details()

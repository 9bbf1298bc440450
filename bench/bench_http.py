"""Streamed tokens/s through the OpenAI HTTP door against the gRPC door of the same gateway, at
1, 8 and 32 concurrent streams, in one run (both doors share the gateway core, replicas and
model; the difference is the door and its client: `openai.AsyncOpenAI` against `grpc.aio`).

    python bench/bench_http.py [--model DIR] [--max-tokens 64] [--concurrency 1,8,32]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.bench_throughput import make_prompts  # noqa: E402
from bench.common import machine  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402


async def grpc_rate(address: str, prompts, max_tokens: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(ids) -> int:
            request = pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(
                max_tokens=max_tokens, ignore_eos=True))
            return sum([len(m.token_ids) async for m in stub.Generate(request)])

        return await _rate(one, prompts, concurrency)


async def http_rate(base_url: str, prompts, max_tokens: int, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def one(ids) -> int:
        stream = await client.completions.create(
            model="", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    try:
        return await _rate(one, prompts, concurrency)
    finally:
        await client.close()


async def _rate(one, prompts, concurrency: int) -> float:
    await one(prompts[0])  # warm up
    gate = asyncio.Semaphore(concurrency)

    async def limited(ids) -> int:
        async with gate:
            return await one(ids)

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(limited(p) for p in prompts)))
    return total / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="default: the tiny test model")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    a = p.parse_args()
    prompts = make_prompts(a.num_requests, 500)
    rows = []
    with LocalMesh(MeshSpec(model=a.model, port=0)) as mesh:
        for c in (int(x) for x in a.concurrency.split(",")):
            g = asyncio.run(grpc_rate(mesh.gateway_address, prompts, a.max_tokens, c))
            h = asyncio.run(http_rate(mesh.http_url, prompts, a.max_tokens, c))
            rows.append((c, g, h))
    name = Path(a.model).name if a.model else "meshserve-tiny-llama"
    print(f"\n### OpenAI HTTP vs gRPC, streamed ({name}, {a.num_requests} requests x "
          f"{a.max_tokens} tokens)\n\nMachine: {machine()}\n")
    print("| concurrency | gRPC tokens/s | HTTP tokens/s | HTTP / gRPC |")
    print("|---:|---:|---:|---:|")
    for c, g, h in rows:
        print(f"| {c} | {g:.0f} | {h:.0f} | {h / g:.2f}x |")


if __name__ == "__main__":
    main()

"""Scheduler features, measured side by side in one run:

1. time to first token of a long prompt whose prefix is cached vs not cached;
2. inter-token latency of running decodes while long prompts arrive, chunked prefill vs not.

    python bench/bench_scheduler.py [--model DIR] [--prompt-len 900]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.common import machine  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [1] + [rng.randrange(3, 500) for _ in range(n - 1)]


def ttft(stub, prompt: list[int]) -> float:
    start = time.perf_counter()
    stream = stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt,
                                              sampling=pb.SamplingParams(max_tokens=2)))
    next(stream)
    elapsed = time.perf_counter() - start
    for _ in stream:
        pass
    return elapsed


def bench_ttft(args, rng) -> tuple[float, float]:
    spec = MeshSpec(model=args.model, port=0, worker_args=args.worker_args)
    cold, warm = [], []
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        ttft(stub, random_prompt(rng, 32))  # warm up
        for _ in range(args.repeats):
            prompt = random_prompt(rng, args.prompt_len)
            cold.append(ttft(stub, prompt))  # nothing of it cached
            warm.append(ttft(stub, prompt))  # all full blocks cached
    return statistics.median(cold), statistics.median(warm)


def decode_gaps(stub, stop: threading.Event, gaps: list[float]) -> None:
    stream = stub.Generate(pb.GenerateRequest(
        prompt_token_ids=[1, 5, 6, 7], sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True)))
    last = None
    for msg in stream:
        now = time.perf_counter()
        if last is not None and msg.token_ids:
            gaps.append((now - last) / len(msg.token_ids))
        last = now
        if stop.is_set():
            stream.cancel()
            return


def bench_itl(args, rng, scheduler_args: tuple[str, ...]) -> tuple[float, float]:
    """(median, p99) inter-token latency of 4 decodes while 4 long prompts arrive one by one."""
    spec = MeshSpec(model=args.model, port=0, worker_args=args.worker_args,
                    scheduler_args=scheduler_args)
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        ttft(stub, random_prompt(rng, 32))
        stop, gaps = threading.Event(), []
        decoders = [threading.Thread(target=decode_gaps, args=(stub, stop, gaps))
                    for _ in range(4)]
        for t in decoders:
            t.start()
        time.sleep(0.5)
        for _ in range(4):
            ttft(stub, random_prompt(rng, args.prompt_len))
        stop.set()
        for t in decoders:
            t.join()
    gaps.sort()
    return statistics.median(gaps), gaps[int(0.99 * (len(gaps) - 1))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--prompt-len", type=int, default=900)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=64, help="token budget per step when chunked")
    a = p.parse_args()
    a.worker_args = ("--num-kv-blocks", "512")
    rng = random.Random(0)
    cold, warm = bench_ttft(a, rng)
    chunked = bench_itl(a, rng, ("--max-num-batched-tokens", str(a.chunk)))
    whole = bench_itl(a, rng, ("--no-chunked-prefill", "--max-num-batched-tokens", "2048"))
    print(f"\n### Scheduler: prefix cache and chunked prefill ({a.prompt_len}-token prompts)\n")
    print(f"Machine: {machine()}\n")
    print("| measure | this | baseline | ratio |\n|---|---:|---:|---:|")
    print(f"| time to first token, prefix cached vs not (median of {a.repeats}) | "
          f"{warm * 1e3:.1f} ms | {cold * 1e3:.1f} ms | {cold / warm:.2f}x faster |")
    print(f"| decode inter-token latency p99 while long prompts arrive, chunked ({a.chunk}) vs "
          f"unchunked | {chunked[1] * 1e3:.1f} ms | {whole[1] * 1e3:.1f} ms | "
          f"{whole[1] / chunked[1]:.2f}x lower |")
    print(f"| same, median | {chunked[0] * 1e3:.1f} ms | {whole[0] * 1e3:.1f} ms | "
          f"{whole[0] / chunked[0]:.2f}x |")


if __name__ == "__main__":
    main()

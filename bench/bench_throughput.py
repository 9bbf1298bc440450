"""Mesh throughput (generated tokens/s) at 1, 8 and 32 concurrent requests, against
transformers' `generate` on the same prompts and model in the same run: one request at a time,
and all of them as one static batch (left-padded), the best a plain `generate` loop can do.

    python bench/bench_throughput.py [--model DIR] [--num-requests 32] [--max-tokens 64]
                                     [--repeats 3] [--stream-intervals 1,8] [--doors grpc,http]
                                     [--cpu-binds auto,off]

The static batch and the mesh run --repeats times, alternately, with the mesh up (and idle while
transformers runs): on a small shared machine either moves by tens of percent from one run to
the next, so the table gives the median of each and the median of the per-round ratios. With
several --stream-intervals one mesh per value is up (its gateway's --stream-interval), each
measured in every round. Each round also runs a worker's model runner in this process, driven
by the scheduler without any gRPC (the mesh's ceiling on the machine). The mesh is measured
through each of --doors: gRPC streaming Generate (grpc.aio, one channel) and the OpenAI HTTP
door (streamed /v1/completions read by aiohttp, as vLLM's own serving benchmark reads it), with
the CPU each of the mesh's processes and the client spent per token. With several --cpu-binds,
one mesh per value is up too (MeshSpec.cpu_bind: auto gives a CPU worker CPUs of its own,
deploy/cpu_binding.py; the client then keeps off them too, as a client on another machine
would). Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.common import (bind_threads, completion_events, cpu_seconds, drive,  # noqa: E402
                          machine, served_model)
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from services.model.default_model import ensure_default_model  # noqa: E402


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 64))] for _ in range(n)]


def hf_tokens_per_s(model_dir: Path, prompts, max_tokens: int) -> float:
    from transformers import LlamaForCausalLM

    # The same device and dtype as the mesh's workers pick by default.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
    total, start = 0, time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_tokens,
                                 do_sample=False,
                                 min_new_tokens=max_tokens, pad_token_id=0)
            total += out.shape[1] - len(ids)
    return total / (time.perf_counter() - start)


def hf_static_batch_tokens_per_s(model_dir: Path, prompts, max_tokens: int) -> float:
    """Every prompt in one left-padded `generate` call (attention mask over the padding)."""
    from transformers import LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:2], **{**kwargs, "attention_mask": mask[:2], "max_new_tokens": 4,
                                   "min_new_tokens": 4})  # warm up
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
    return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - start)


def runner_tokens_per_s(model_dir: Path, prompts, max_tokens: int) -> float:
    """A worker's model runner in this process, driven by a replica's scheduler as the engine
    drives it (plans through the wire format, three in flight) with no gRPC, gateway or client:
    what the model's steps alone give on this machine, the mesh's ceiling here."""
    from services.worker.settings import WorkerSettings
    from services.worker.shard import WorkerShard

    shard = WorkerShard.load(WorkerSettings(model=str(model_dir), max_num_seqs=len(prompts)))
    start = time.perf_counter()
    _, outputs = drive(shard.runner, shard.num_kv_blocks, prompts, max_tokens,
                       max_num_batched_tokens=2048, through_wire=True)
    return sum(len(ids) for ids in outputs.values()) / (time.perf_counter() - start)


def grpc_tokens(address: str, prompts, max_tokens: int, concurrency: int) -> int:
    """Streams every prompt through the gateway's gRPC door, `concurrency` at a time, all of
    them started at once on one asyncio loop; the tokens they returned."""
    async def run() -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            stub, slots = pb_grpc.GenerationStub(channel), asyncio.Semaphore(concurrency)

            async def one(ids) -> int:
                async with slots:
                    n = 0
                    async for msg in stub.Generate(pb.GenerateRequest(
                            prompt_token_ids=ids,
                            sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))):
                        n += len(msg.token_ids)
                    return n

            return sum(await asyncio.gather(*(one(ids) for ids in prompts)))

    return asyncio.run(run())


def grpc_tokens_per_s(address: str, prompts, max_tokens: int, concurrency: int) -> float:
    """grpc_tokens, after a short warm-up, per second of its run."""
    grpc_tokens(address, prompts[:1], 4, 1)
    start = time.perf_counter()
    return grpc_tokens(address, prompts, max_tokens, concurrency) / (time.perf_counter() - start)


def http_tokens(address: str, model: str, prompts, max_tokens: int, concurrency: int) -> int:
    """The same through the OpenAI HTTP door: streamed completions, each server-sent event
    parsed as it comes, the tokens counted from the usage chunk."""
    import aiohttp

    async def run() -> int:
        async with aiohttp.ClientSession(f"http://{address}") as session:
            slots = asyncio.Semaphore(concurrency)

            async def one(ids) -> int:
                n = 0
                async with slots:
                    async for event in completion_events(session, model, ids, max_tokens):
                        n = (event.get("usage") or {}).get("completion_tokens", n)
                return n

            return sum(await asyncio.gather(*(one(ids) for ids in prompts)))

    return asyncio.run(run())


class Door:
    """One way into a running mesh; `measure` also reads the CPU each of its processes and the
    client (this process) spent per token."""

    def __init__(self, mesh: LocalMesh, kind: str):
        self.mesh, self.kind = mesh, kind
        self.http = f"127.0.0.1:{mesh.http_port}"
        if kind == "http":
            self.model = served_model(self.http)

    def stream(self, prompts, max_tokens: int, concurrency: int) -> int:
        if self.kind == "grpc":
            return grpc_tokens(self.mesh.gateway_address, prompts, max_tokens, concurrency)
        return http_tokens(self.http, self.model, prompts, max_tokens, concurrency)

    def measure(self, prompts, max_tokens: int, concurrency: int) -> tuple[float, dict]:
        """(tokens/s, {process: CPU us per token})."""
        self.stream(prompts[:1], 4, 1)  # warm up
        children = self.mesh.children
        before = [cpu_seconds(c.proc.pid) for c in children]
        placed = os.sched_getaffinity(0)
        if self.mesh.cpu_plan is not None:  # the client (gRPC's threads too) keeps off the
            bind_threads(set(self.mesh.cpu_plan.rest))  # workers' CPUs, as the mesh's own do
        try:
            cpu, start = time.process_time(), time.perf_counter()
            tokens = self.stream(prompts, max_tokens, concurrency)
            wall = time.perf_counter() - start
        finally:
            bind_threads(placed)
        per_token = {_role(c.name): (cpu_seconds(c.proc.pid) - b) * 1e6 / tokens
                     for c, b in zip(children, before)}
        per_token["client"] = (time.process_time() - cpu) * 1e6 / tokens
        return tokens / wall, per_token


def _role(name: str) -> str:
    return "worker" if "worker" in name else name.rsplit("-", 1)[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream-intervals", default="1",
                   help="the gateways' --stream-interval values to measure, e.g. 1,8")
    p.add_argument("--cpu-binds", default="auto",
                   help="the meshes' CPU binding to measure: auto, off or both")
    p.add_argument("--doors", default="grpc,http",
                   help="the gateway's doors to stream through: grpc, http or both")
    a = p.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(a.model) if a.model else ensure_default_model()
    from services.model.config import ModelConfig

    vocab = min(ModelConfig.from_dir(model_dir).vocab_size, 32000)
    prompts = make_prompts(a.num_requests, vocab)
    baseline = hf_tokens_per_s(model_dir, prompts[:8], a.max_tokens)
    concurrency = [int(x) for x in a.concurrency.split(",")]
    intervals = [int(x) for x in a.stream_intervals.split(",")]
    doors = a.doors.split(",")
    binds = a.cpu_binds.split(",")
    cases = [(d, i, b, c) for d in doors for i in intervals for b in binds for c in concurrency]
    statics, runner_rates = [], []  # per round
    rates = {case: [] for case in cases}
    cpu = {case: [] for case in cases}  # per round: {process: us per token}
    with contextlib.ExitStack() as stack:
        meshes = {(i, b): stack.enter_context(LocalMesh(MeshSpec(
            model=a.model, tp=a.tp, port=0, gateway_args=("--stream-interval", str(i)),
            cpu_bind=b))) for i in intervals for b in binds}
        entries = {(d, i, b): Door(meshes[i, b], d) for d in doors for i, b in meshes}
        for _ in range(a.repeats):
            statics.append(hf_static_batch_tokens_per_s(model_dir, prompts, a.max_tokens))
            runner_rates.append(runner_tokens_per_s(model_dir, prompts, a.max_tokens))
            for d, i, b, c in cases:
                rate, per_token = entries[d, i, b].measure(prompts, a.max_tokens, c)
                rates[d, i, b, c].append(rate)
                cpu[d, i, b, c].append(per_token)
    static = statistics.median(statics)
    print(f"\n### Mesh throughput vs transformers generate ({model_dir.name}, tp={a.tp}, "
          f"{a.num_requests} requests x {a.max_tokens} tokens)\n")
    print(f"Machine: {machine()}\n")
    print(f"transformers `generate`: {baseline:.0f} tokens/s one request at a time; all "
          f"{len(prompts)} prompts as one static batch: {_runs(statics)} tokens/s in "
          f"{a.repeats} rounds (median {static:.0f}).\n")
    runner_ratio = statistics.median(r / s for r, s in zip(runner_rates, statics))
    print(f"The worker's model runner alone in this process (the scheduler's plans, no gRPC, "
          f"gateway or client), all {len(prompts)} at once: {_runs(runner_rates)} tokens/s "
          f"({runner_ratio:.2f}x the static batch, median of the rounds' ratios).\n")
    names = list(cpu[cases[0]][0])
    print("| door | stream interval | CPU binding | concurrency | mesh tokens/s, per round | "
          "median | vs 1 at a time | vs one static batch (median of the rounds' ratios) | CPU us "
          "per token: " + ", ".join(names) + " (medians) |")
    print("|---|---:|---|---:|---|---:|---:|---:|---|")
    for case, runs in rates.items():
        rate = statistics.median(runs)
        ratio = statistics.median(r / s for r, s in zip(runs, statics))
        spent = ", ".join(f"{statistics.median(r[n] for r in cpu[case]):.0f}" for n in names)
        print(f"| {' | '.join(map(str, case))} | {_runs(runs)} | {rate:.0f} | "
              f"{rate / baseline:.2f}x | {ratio:.2f}x | {spent} |")


def _runs(values) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    main()

"""Streamed tokens/s through the OpenAI HTTP door against the gRPC door of the same gateway, at
1, 8 and 32 concurrent streams, in one run (both doors share the gateway core, replicas and
model; the difference is the door and its client: `openai.AsyncOpenAI` against `grpc.aio`).
Each stream's time to first token and the gaps between its chunks are kept, and drawn as
distributions (CDFs) beside tokens/s against concurrency (`--plot`, needs matplotlib: the
`bench` extra).

    python bench/bench_http.py [--model DIR] [--max-tokens 64] [--concurrency 1,8,32]
                               [--plot bench/plots/http_vs_grpc.png]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_throughput import make_prompts  # noqa: E402
from bench.common import add_stream_flags, figure, machine, save_figure  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class Run:
    """One door at one concurrency: tokens/s, and every stream's latencies (seconds)."""

    tokens_per_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # between a stream's token-bearing chunks


async def grpc_rate(address: str, prompts, max_tokens: int, concurrency: int) -> float:
    return (await grpc_run(address, prompts, max_tokens, concurrency)).tokens_per_s


async def grpc_run(address: str, prompts, max_tokens: int, concurrency: int) -> Run:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(ids, clock) -> int:
            request = pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(
                max_tokens=max_tokens, ignore_eos=True))
            count = 0
            async for m in stub.Generate(request):
                if m.token_ids:
                    clock.tick()
                count += len(m.token_ids)
            return count

        return await _run(one, prompts, concurrency)


async def http_run(base_url: str, prompts, max_tokens: int, concurrency: int) -> Run:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def one(ids, clock) -> int:
        stream = await client.completions.create(
            model="", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                clock.tick()
            usage = chunk.usage or usage
        return usage.completion_tokens

    try:
        return await _run(one, prompts, concurrency)
    finally:
        await client.close()


class _Clock:
    """A stream's times: the first tick is its time to first token, the others its gaps."""

    def __init__(self, run: Run):
        self.run, self.last = run, time.perf_counter()
        self.started = self.last
        self.first = True

    def tick(self) -> None:
        now = time.perf_counter()
        (self.run.ttft if self.first else self.run.gaps).append(now - self.last)
        self.first, self.last = False, now


async def _run(one, prompts, concurrency: int) -> Run:
    await one(prompts[0], _Clock(Run()))  # warm up
    gate = asyncio.Semaphore(concurrency)
    run = Run()

    async def limited(ids) -> int:
        async with gate:
            return await one(ids, _Clock(run))

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(limited(p) for p in prompts)))
    run.tokens_per_s = total / (time.perf_counter() - start)
    return run


def plot(runs: dict[tuple[str, int], Run], title: str, path: Path) -> None:
    """TTFT and inter-chunk gap CDFs per door and concurrency, and tokens/s vs concurrency."""
    plt, fig, (ax_ttft, ax_gap, ax_rate) = figure(3, (15, 4.5))
    styles = {"gRPC": "-", "HTTP": "--"}
    concurrencies = sorted({c for _, c in runs})
    colors = dict(zip(concurrencies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (door, c), run in sorted(runs.items()):
        for ax, values in ((ax_ttft, run.ttft), (ax_gap, run.gaps)):
            xs = np.sort(np.asarray(values) * 1e3)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), styles[door], color=colors[c],
                    label=f"{door}, {c} streams")
    for door, style in styles.items():
        ax_rate.plot(concurrencies, [runs[(door, c)].tokens_per_s for c in concurrencies],
                     style + "o", label=door)
    ax_ttft.set(title="time to first token", xlabel="ms", ylabel="share of streams",
                xscale="log")
    ax_gap.set(title="gap between a stream's chunks", xlabel="ms", ylabel="share of gaps",
               xscale="log")
    ax_rate.set(title="throughput", xlabel="concurrent streams", ylabel="tokens/s",
                xscale="log")
    ax_rate.set_xticks(concurrencies, [str(c) for c in concurrencies])
    save_figure(fig, (ax_ttft, ax_gap, ax_rate), title, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_flags(p)
    p.add_argument("--plot", default="", help="draw the distributions into this PNG file")
    a = p.parse_args()
    prompts = make_prompts(a.num_requests, 500)
    runs: dict[tuple[str, int], Run] = {}
    with LocalMesh(MeshSpec(model=a.model, port=0)) as mesh:
        for c in (int(x) for x in a.concurrency.split(",")):
            runs[("gRPC", c)] = asyncio.run(grpc_run(mesh.gateway_address, prompts,
                                                     a.max_tokens, c))
            runs[("HTTP", c)] = asyncio.run(http_run(mesh.http_url, prompts, a.max_tokens, c))
    name = Path(a.model).name if a.model else "meshserve-tiny-llama"
    title = f"OpenAI HTTP vs gRPC, streamed ({name}, {a.num_requests} requests x {a.max_tokens} tokens)"
    print(f"\n### {title}\n\nMachine: {machine()}\n")
    print("| concurrency | gRPC tokens/s | HTTP tokens/s | HTTP / gRPC | TTFT p50 / p99 ms, gRPC "
          "| HTTP |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in sorted({c for _, c in runs}):
        g, h = runs[("gRPC", c)], runs[("HTTP", c)]
        pct = lambda xs: " / ".join(f"{np.percentile(xs, q) * 1e3:.1f}" for q in (50, 99))  # noqa: E731
        print(f"| {c} | {g.tokens_per_s:.0f} | {h.tokens_per_s:.0f} | "
              f"{h.tokens_per_s / g.tokens_per_s:.2f}x | {pct(g.ttft)} | {pct(h.ttft)} |")
    if a.plot:
        plot(runs, title, Path(a.plot))
        print(f"\n![{title}](plots/{Path(a.plot).name})")  # as bench/RESULTS.md embeds it


if __name__ == "__main__":
    main()

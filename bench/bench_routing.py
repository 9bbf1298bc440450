"""What routing buys on a shared-prefix workload: the gateway's routing policies (prefix: by
cost; least-load; round-robin) side by side, in one run, each on a fresh mesh of 4 replicas.

The workload is llm-d's shape scaled down to this machine: G groups of requests, each group
sharing a long prefix (a system prompt), with a short unique tail; Poisson arrivals at several
rates. The KV pools are sized so that every group's prefix fits in the mesh but not in one
replica: a policy that sends a group where its prefix is cached saves that prefill.

    python bench/bench_routing.py [--rates 8,16,32] [--groups 8] [--prefix-tokens 768]
                                  [--plot bench/plots/routing.png]
    python bench/bench_routing.py --skew 0.8 --policies prefix --rates 16   # one hot prefix
    python bench/bench_routing.py --api-servers 2 --policies prefix          # two gateways

Prints a markdown section for bench/RESULTS.md: TTFT p50 / p90 / p99, the prefix hit rate
(cached prompt tokens / prompt tokens) and output tokens/s per policy and rate, and how the
requests spread over the replicas (the busiest one's share against the mean).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import OWN_CONNECTION, figure, machine, save_figure  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

POLICIES = ("prefix", "least-load", "round-robin")


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    per_replica: list[int] = field(default_factory=list)  # requests each replica finished

    @property
    def spread(self) -> float:
        """The busiest replica's requests over the mean (1.0 = even)."""
        return max(self.per_replica) / (sum(self.per_replica) / len(self.per_replica))

    def row(self) -> tuple:
        p50, p90, p99 = (np.percentile(self.ttft, q) * 1e3 for q in (50, 90, 99))
        return (p50, p90, p99, self.cached_tokens / max(1, self.prompt_tokens),
                self.output_tokens / self.seconds)


def workload(num_requests: int, groups: int, prefix_tokens: int, rng: random.Random,
             skew: float = 0.0):
    """Prompts of a random group each (group 0 with probability skew, when skew > 0)."""
    prefixes = [[1] + [rng.randrange(3, 250) for _ in range(prefix_tokens - 1)]
                for _ in range(groups)]

    def group() -> int:
        return 0 if rng.random() < skew else rng.randrange(groups)

    return [prefixes[group()] + [rng.randrange(3, 250) for _ in range(16)]
            for _ in range(num_requests)]


def finished_per_replica(mesh: LocalMesh, num_replicas: int) -> list[int]:
    """Requests each replica has finished, from its scheduler's metrics."""
    return [_sample_sum(mesh, f"replica-{r}-scheduler",
                        "meshserve:request_inference_time_seconds_count")
            for r in range(num_replicas)]


def finished_per_gateway(mesh: LocalMesh, num_gateways: int) -> list[int]:
    names = ["gateway"] + [f"gateway-{i}" for i in range(1, num_gateways)]
    return [_sample_sum(mesh, name, "meshserve:request_success_total") for name in names]


def _sample_sum(mesh: LocalMesh, process: str, sample: str) -> int:
    text = urllib.request.urlopen(mesh.metrics_url(process)).read().decode()
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == sample))


async def run_rate(address: str, prompts, rate: float, max_tokens: int,
                   rng: random.Random, num_connections: int = 1) -> Result:
    """Poisson arrivals of prompts at rate, over num_connections TCP connections (gateways
    sharing the port get connections, not requests, from the kernel)."""
    result = Result()
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION)
                for _ in range(num_connections)]
    stubs = [pb_grpc.GenerationStub(c) for c in channels]
    try:
        async def one(ids, stub) -> None:
            started, first, last = time.perf_counter(), None, None
            request = pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(
                max_tokens=max_tokens, ignore_eos=True))
            async for msg in stub.Generate(request, timeout=300):
                if msg.token_ids and first is None:
                    first = time.perf_counter() - started
                last = msg
            result.ttft.append(first)
            result.prompt_tokens += last.usage.prompt_tokens
            result.cached_tokens += last.usage.cached_prompt_tokens
            result.output_tokens += last.usage.completion_tokens

        start, tasks = time.perf_counter(), []
        for i, ids in enumerate(prompts):
            tasks.append(asyncio.create_task(one(ids, stubs[i % len(stubs)])))
            await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()
    return result


def plot(results: dict[tuple[str, float], Result], rates, path: Path, title: str) -> None:
    plt, fig, (ax_ttft, ax_hit) = figure(2, (11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for policy, color in zip(POLICIES, colors):
        rows = [results[(policy, r)].row() for r in rates]
        ax_ttft.plot(rates, [row[0] for row in rows], "o-", color=color, label=f"{policy} p50")
        ax_ttft.plot(rates, [row[2] for row in rows], "o:", color=color, alpha=0.6,
                     label=f"{policy} p99")
        ax_hit.plot(rates, [100 * row[3] for row in rows], "o-", color=color, label=policy)
    ax_ttft.set(title="time to first token", xlabel="requests/s", ylabel="ms", yscale="log")
    ax_hit.set(title="prefix hit rate", xlabel="requests/s", ylabel="% of prompt tokens cached",
               ylim=(0, 100))
    save_figure(fig, (ax_ttft, ax_hit), title, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="8,16,32", help="requests/s, comma-separated")
    p.add_argument("--requests-per-rate", type=int, default=48)
    p.add_argument("--groups", type=int, default=8)
    # 768 of the tiny model's 1,024 positions: a prefill long enough that repeating it is what a
    # policy costs (llm-d's groups share 6k-token prefixes)
    p.add_argument("--prefix-tokens", type=int, default=768)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=160,
                   help="per replica: room for a few groups' prefixes, not all of them "
                        "(8 x 768 tokens are 384 blocks of 16; 160 hold 3 groups)")
    p.add_argument("--plot", default="")
    p.add_argument("--skew", type=float, default=0.0,
                   help="share of requests in one group (0: groups equally likely)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--api-servers", type=int, default=1,
                   help="gateway processes sharing the port (requests over 8 connections each)")
    a = p.parse_args()
    policies = a.policies.split(",")
    rates = [float(x) for x in a.rates.split(",")]
    results: dict[tuple[str, float], Result] = {}
    for policy in policies:
        rng = random.Random(0)  # every policy gets the same prompts and arrival times
        spec = MeshSpec(port=0, http_port=-1, replicas=4,
                        worker_args=("--num-kv-blocks", str(a.kv_blocks)),
                        gateway_args=("--routing-policy", policy),
                        api_server_count=a.api_servers)
        connections = 8 * a.api_servers if a.api_servers > 1 else 1
        with LocalMesh(spec) as mesh:
            warm = workload(a.groups * 2, a.groups, a.prefix_tokens, random.Random(1))
            asyncio.run(run_rate(mesh.gateway_address, warm, 50.0, 1, rng))  # warm up
            for rate in rates:
                prompts = workload(a.requests_per_rate, a.groups, a.prefix_tokens,
                                   random.Random(1), a.skew)
                before = finished_per_replica(mesh, 4)
                results[(policy, rate)] = asyncio.run(run_rate(
                    mesh.gateway_address, prompts, rate, a.max_tokens, rng, connections))
                time.sleep(0.3)  # the last finishes reach the schedulers' counters
                results[(policy, rate)].per_replica = [
                    x - y for x, y in zip(finished_per_replica(mesh, 4), before)]
            if a.api_servers > 1:
                print(f"{policy}: requests per gateway {finished_per_gateway(mesh, a.api_servers)}",
                      flush=True)
                print(f"{policy} at {rate:g} req/s: {results[(policy, rate)].row()}",
                      file=sys.stderr, flush=True)
    skew = f", {100 * a.skew:.0f} % of requests in one group" if a.skew else ""
    skew += f", {a.api_servers} gateways" if a.api_servers > 1 else ""
    title = (f"Routing on a shared-prefix workload (4 replicas, {a.groups} groups x "
             f"{a.prefix_tokens}-token prefixes{skew}, {a.requests_per_rate} requests per rate)")
    print(f"\n### {title}\n\nMachine: {machine()}\n")
    print("| rate, req/s | policy | TTFT p50 / p90 / p99 ms | prefix hit rate | output tokens/s "
          "| requests per replica | busiest / mean |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for rate in rates:
        for policy in policies:
            result = results[(policy, rate)]
            p50, p90, p99, hit, tps = result.row()
            print(f"| {rate:g} | {policy} | {p50:.0f} / {p90:.0f} / {p99:.0f} | "
                  f"{100 * hit:.0f} % | {tps:.0f} | {result.per_replica} | {result.spread:.2f} |")
    top = rates[-1]
    if {"prefix", "round-robin"} <= set(policies):
        ratio = results[("round-robin", top)].row()[0] / results[("prefix", top)].row()[0]
        print(f"\nAt {top:g} req/s, TTFT p50 of round-robin / prefix: {ratio:.2f}x")
    if a.plot and len(policies) == len(POLICIES):
        plot(results, rates, Path(a.plot), title)
        print(f"\n![{title}](plots/{Path(a.plot).name})")


if __name__ == "__main__":
    main()

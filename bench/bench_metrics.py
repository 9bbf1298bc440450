"""What the metrics cost: streamed tokens/s of a mesh with its metrics on (the default) against
the same mesh with `--disable-log-stats` on the gateway and the scheduler, at 1, 8 and 32
concurrent streams, in one run. The two meshes are measured in adjacent pairs (on, off; off,
on; ...), and each pair gives a ratio: a drift of the machine falls on both halves of a pair.
The median of the pairs' ratios is the figure.

    python bench/bench_metrics.py [--model DIR] [--max-tokens 64] [--concurrency 1,8,32]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_http import grpc_rate  # noqa: E402
from bench.bench_throughput import make_prompts  # noqa: E402
from bench.common import add_stream_flags, machine  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_flags(p)
    p.add_argument("--turns", type=int, default=7, help="pairs per concurrency")
    p.add_argument("--off-first", action="store_true",
                   help="start the mesh without metrics first (placement on the machine)")
    a = p.parse_args()
    prompts = make_prompts(a.num_requests, 500)
    off = ("--disable-log-stats",)
    on_spec = MeshSpec(model=a.model, port=0, http_port=-1)
    off_spec = MeshSpec(model=a.model, port=0, http_port=-1, gateway_args=off,
                        scheduler_args=off)
    rows = []
    first, second = (off_spec, on_spec) if a.off_first else (on_spec, off_spec)
    with LocalMesh(first) as m1, LocalMesh(second) as m2:
        on, off_mesh = (m2, m1) if a.off_first else (m1, m2)
        for c in (int(x) for x in a.concurrency.split(",")):
            rates = {"on": [], "off": []}
            for turn in range(a.turns):
                order = (("on", on), ("off", off_mesh))
                for label, mesh in order if turn % 2 == 0 else order[::-1]:
                    rates[label].append(asyncio.run(grpc_rate(mesh.gateway_address, prompts,
                                                              a.max_tokens, c)))
            ratios = [x / y for x, y in zip(rates["on"], rates["off"])]
            rows.append((c, statistics.median(rates["on"]), statistics.median(rates["off"]),
                         statistics.median(ratios), min(ratios), max(ratios)))
    name = Path(a.model).name if a.model else "meshserve-tiny-llama"
    print(f"\n### Metrics on vs off ({name}, {a.num_requests} requests x {a.max_tokens} tokens, "
          f"{a.turns} pairs)\n\nMachine: {machine()}\n")
    print("| concurrency | metrics off, tokens/s | metrics on, tokens/s | on / off, median of "
          "pairs | range |")
    print("|---:|---:|---:|---:|---:|")
    for c, rate_on, rate_off, ratio, low, high in rows:
        print(f"| {c} | {rate_off:.0f} | {rate_on:.0f} | {ratio:.3f}x | {low:.2f} - {high:.2f} |")


if __name__ == "__main__":
    main()

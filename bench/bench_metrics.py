"""What the metrics cost: streamed tokens/s of a mesh with its metrics on (the default) against
the same mesh with `--disable-log-stats` on the gateway and the scheduler, at 1, 8 and 32
concurrent streams, in one run. The two meshes are measured in turns (on, off, on, off, ...)
so that a drift of the machine falls on both; the best of the turns is kept.

    python bench/bench_metrics.py [--model DIR] [--max-tokens 64] [--concurrency 1,8,32]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_http import grpc_rate  # noqa: E402
from bench.bench_throughput import make_prompts  # noqa: E402
from bench.common import machine  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="default: the tiny test model")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--turns", type=int, default=3)
    a = p.parse_args()
    prompts = make_prompts(a.num_requests, 500)
    off = ("--disable-log-stats",)
    on_spec = MeshSpec(model=a.model, port=0, http_port=-1)
    off_spec = MeshSpec(model=a.model, port=0, http_port=-1, gateway_args=off,
                        scheduler_args=off)
    rows = []
    with LocalMesh(on_spec) as on, LocalMesh(off_spec) as off_mesh:
        for c in (int(x) for x in a.concurrency.split(",")):
            best = {"on": 0.0, "off": 0.0}
            for _ in range(a.turns):
                for label, mesh in (("on", on), ("off", off_mesh)):
                    rate = asyncio.run(grpc_rate(mesh.gateway_address, prompts, a.max_tokens, c))
                    best[label] = max(best[label], rate)
            rows.append((c, best["on"], best["off"]))
    name = Path(a.model).name if a.model else "meshserve-tiny-llama"
    print(f"\n### Metrics on vs off ({name}, {a.num_requests} requests x {a.max_tokens} tokens, "
          f"best of {a.turns} turns each)\n\nMachine: {machine()}\n")
    print("| concurrency | metrics off, tokens/s | metrics on, tokens/s | on / off |")
    print("|---:|---:|---:|---:|")
    for c, rate_on, rate_off in rows:
        print(f"| {c} | {rate_off:.0f} | {rate_on:.0f} | {rate_on / rate_off:.3f}x |")


if __name__ == "__main__":
    main()

"""Pipeline parallelism: decode throughput at 16 concurrent requests with P micro-batches in
flight vs one, measured side by side in one run.

    python bench/bench_pipeline.py [--model DIR] [--pp 2] [--tp 1]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_throughput import grpc_tokens_per_s, make_prompts  # noqa: E402
from bench.common import machine  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402


def throughput(args, inflight: int, prompts) -> float:
    spec = MeshSpec(model=args.model, tp=args.tp, pp=args.pp, port=0,
                    worker_args=("--num-kv-blocks", "512"),
                    scheduler_args=("--max-inflight-steps", str(inflight)))
    with LocalMesh(spec) as mesh:
        return grpc_tokens_per_s(mesh.gateway_address, prompts, args.max_tokens, len(prompts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    a = p.parse_args()
    prompts = make_prompts(a.concurrency, 500, seed=1)
    one = throughput(a, 1, prompts)
    many = throughput(a, a.pp + 1, prompts)
    print(f"\n### Pipeline micro-batches (tp={a.tp} pp={a.pp}, {a.concurrency} concurrent "
          f"requests x {a.max_tokens} tokens)\n")
    print(f"Machine: {machine()}\n")
    print("| plans in flight | decode tokens/s | ratio |\n|---|---:|---:|")
    print(f"| 1 (no pipelining) | {one:.0f} | 1.00x |")
    print(f"| {a.pp + 1} ({a.pp} micro-batches + 1 queued) | {many:.0f} | {many / one:.2f}x |")


if __name__ == "__main__":
    main()

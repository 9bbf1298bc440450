"""`meshserve plan`'s arithmetic against what the workers measure, for every layout that runs
on this machine: per rank, the weights and KV pool it holds (`meshserve:worker_memory_bytes`) and
the bytes it all-reduces, all-gathers and sends to the next stage per token
(`meshserve:tp_collective_bytes_total`, `meshserve:stage_link_sent_bytes_total`), against
deploy.plan.rank_bytes for the same shape. Prints one markdown table with the ratios.

    python bench/bench_plan.py [--model DIR] [--layouts 1x1,2x1,4x1,1x2,1x4] [--num-kv-blocks 64]

Each layout runs on a fresh mesh (tp x pp given as TPxPP), 4 requests of 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.common import machine  # noqa: E402
from deploy import plan  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from services.model.default_model import write_tiny_checkpoint  # noqa: E402
from tests.integration.conftest import scrape, value  # noqa: E402

PROMPTS = [[1] + [(7 * i + j) % 200 + 3 for j in range(12 + 3 * i)] for i in range(4)]
MAX_TOKENS = 32
BLOCK_SIZE = 16


def measure(model: Path, tp: int, pp: int, num_kv_blocks: int, eager: bool = False
            ) -> list[dict]:
    """Per rank: its stage, memory and per-token collective and link bytes."""
    spec = MeshSpec(model=str(model), tp=tp, pp=pp, port=0, http_port=-1,
                    worker_args=("--num-kv-blocks", str(num_kv_blocks),
                                 *(["--enforce-eager"] if eager else [])))
    with LocalMesh(spec) as mesh:
        names = [f"replica-0-worker-pp{s}-tp{r}" for s in range(pp) for r in range(tp)]
        before = {n: scrape(mesh.metrics_url(n)) for n in [*names, "replica-0-scheduler"]}
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for ids in PROMPTS:
                list(stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(
                    max_tokens=MAX_TOKENS, ignore_eos=True)), timeout=120))
        after = {n: scrape(mesh.metrics_url(n)) for n in before}

    def moved(name: str, metric: str, **labels) -> float:
        return value(after[name], metric, **labels) - value(before[name], metric, **labels)

    generated = moved("replica-0-scheduler", "meshserve:generation_tokens_total")
    processed = moved("replica-0-scheduler", "meshserve:prompt_tokens_total") + generated \
        - len(PROMPTS)  # the last token of each request is sampled, never fed back
    rows = []
    for name in names:
        stage, rank = int(name.split("-pp")[1].split("-")[0]), int(name.rsplit("-tp", 1)[1])
        gather = moved(name, "meshserve:tp_collective_bytes_total", op="all_gather")
        rows.append(dict(
            stage=stage, rank=rank, processed=processed, sampled=generated,
            weights=value(after[name], "meshserve:worker_memory_bytes", kind="weights"),
            kv_cache=value(after[name], "meshserve:worker_memory_bytes", kind="kv_cache"),
            all_reduce=moved(name, "meshserve:tp_collective_bytes_total", op="all_reduce"),
            all_gather=gather,
            stage_link=moved(name, "meshserve:stage_link_sent_bytes_total")))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="default: the tiny test model")
    p.add_argument("--layouts", default="1x1,2x1,4x1,1x2,1x4")
    p.add_argument("--num-kv-blocks", type=int, default=64)
    p.add_argument("--enforce-eager", action="store_true",
                   help="workers without CUDA graphs (they start faster; the bytes are the same)")
    p.add_argument("--dtype-bytes", type=int, default=0,
                   help="bytes per weight (default: 2 with a GPU, bfloat16; 4 on CPUs, float32)")
    a = p.parse_args()
    import torch

    dtype_bytes = a.dtype_bytes or (2 if torch.cuda.is_available() else 4)
    model = Path(a.model) if a.model else Path("/tmp/meshserve-bench/tiny-llama")
    if not a.model and not (model / "config.json").exists():
        write_tiny_checkpoint(model)
    shape = plan.Shape.from_config(json.loads((model / "config.json").read_text()))
    print(f"\n### meshserve plan vs the workers' own figures ({model.name}, {dtype_bytes} bytes "
          f"per value, {len(PROMPTS)} requests x {MAX_TOKENS} tokens)\n")
    print(f"Machine: {machine()}\n")
    print("| TP x PP | stage | weights, plan / measured | KV pool | all-reduce bytes per token "
          "| all-gather bytes | stage-link bytes per token | within 20 % |")
    print("|---|---:|---|---|---|---|---|---|")
    for layout in a.layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        for row in measure(model, tp, pp, a.num_kv_blocks, a.enforce_eager):
            if row["rank"]:
                continue  # every rank of a stage holds and sends the same
            want = plan.rank_bytes(shape, tp, pp, row["stage"], dtype_bytes, BLOCK_SIZE)
            pairs = {
                "weights": (want["weights"], row["weights"]),
                "kv_cache": (want["kv_per_block"] * (a.num_kv_blocks + 1), row["kv_cache"]),
                "all_reduce": (want["all_reduce_per_token"], row["all_reduce"] / row["processed"]),
                "all_gather": (want["all_gather_per_token"] * row["processed"]
                               + want["all_gather_per_sampled_token"] * row["sampled"],
                               row["all_gather"]),
                "stage_link": (want["stage_link_per_token"], row["stage_link"] / row["processed"]),
            }
            ok = all(abs(m - w) <= 0.2 * w for w, m in pairs.values() if w or m)

            def cell(key):
                w, m = pairs[key]
                return f"{w:,.0f} / {m:,.0f}" if w or m else "0 / 0"

            print(f"| {tp} x {pp} | {row['stage']} | {cell('weights')} | {cell('kv_cache')} | "
                  f"{cell('all_reduce')} | {cell('all_gather')} | {cell('stage_link')} | "
                  f"{'yes' if ok else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

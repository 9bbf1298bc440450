"""Mesh throughput (generated tokens/s) at 1, 8 and 32 concurrent requests, against
transformers' `generate` on the same prompts and model in the same run: one request at a time,
and all of them as one static batch (left-padded), the best a plain `generate` loop can do.

    python bench/bench_throughput.py [--model DIR] [--num-requests 32] [--max-tokens 64]
                                     [--repeats 3] [--stream-intervals 1,8]

The static batch and the mesh run --repeats times, alternately, with the mesh up (and idle while
transformers runs): on a small shared machine either moves by tens of percent from one run to
the next, so the table gives the median of each and the median of the per-round ratios. With
several --stream-intervals one mesh per value is up (its gateway's --stream-interval), each
measured in every round. Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.common import machine  # noqa: E402
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


def mesh_tokens_per_s(address: str, prompts, max_tokens: int, concurrency: int) -> float:
    def one(ids) -> int:
        n = 0
        for msg in stub.Generate(pb.GenerateRequest(
                prompt_token_ids=ids,
                sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))):
            n += len(msg.token_ids)
        return n

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        one(prompts[0])  # warm up
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            total = sum(pool.map(one, prompts))
        return total / (time.perf_counter() - start)


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
    a = p.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(a.model) if a.model else ensure_default_model()
    from services.model.config import ModelConfig

    vocab = min(ModelConfig.from_dir(model_dir).vocab_size, 32000)
    prompts = make_prompts(a.num_requests, vocab)
    baseline = hf_tokens_per_s(model_dir, prompts[:8], a.max_tokens)
    concurrency = [int(x) for x in a.concurrency.split(",")]
    intervals = [int(x) for x in a.stream_intervals.split(",")]
    statics, rates = [], {(i, c): [] for i in intervals for c in concurrency}  # per round
    with contextlib.ExitStack() as stack:
        meshes = {i: stack.enter_context(LocalMesh(MeshSpec(
            model=a.model, tp=a.tp, port=0, gateway_args=("--stream-interval", str(i)))))
            for i in intervals}
        for _ in range(a.repeats):
            statics.append(hf_static_batch_tokens_per_s(model_dir, prompts, a.max_tokens))
            for (i, c), runs in rates.items():
                runs.append(mesh_tokens_per_s(meshes[i].gateway_address, prompts, a.max_tokens,
                                              c))
    static = statistics.median(statics)
    print(f"\n### Mesh throughput vs transformers generate ({model_dir.name}, tp={a.tp}, "
          f"{a.num_requests} requests x {a.max_tokens} tokens)\n")
    print(f"Machine: {machine()}\n")
    print(f"transformers `generate`: {baseline:.0f} tokens/s one request at a time; all "
          f"{len(prompts)} prompts as one static batch: {_runs(statics)} tokens/s in "
          f"{a.repeats} rounds (median {static:.0f}).\n")
    print("| stream interval | concurrency | mesh tokens/s, per round | median | vs 1 at a time "
          "| vs one static batch (median of the rounds' ratios) |")
    print("|---:|---:|---|---:|---:|---:|")
    for (i, c), runs in rates.items():
        rate = statistics.median(runs)
        ratio = statistics.median(r / s for r, s in zip(runs, statics))
        print(f"| {i} | {c} | {_runs(runs)} | {rate:.0f} | {rate / baseline:.2f}x | "
              f"{ratio:.2f}x |")


def _runs(values) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    main()

"""n-gram speculative decoding against none, side by side in one run: the same requests (greedy,
and seeded sampling) through a mesh without and with each `--speculative-config`, at batch 1
(time per output token, tokens/s) and at a larger batch (what speculation costs in throughput
there), with the acceptance the scheduler counted and a check that both give the same tokens.

    python bench/bench_speculative.py [--model DIR|tiny] [--dtype float32] [--tokens 96]
        [--batch 16] [--rounds 2]
        [--configs '{"method": "ngram", "num_speculative_tokens": 4};...'] [--sampling greedy,seeded]

The prompts are of the kind whose answers repeat their input (summaries, code edits), where
prompt lookup has something to find. Default model: SmolLM2-135M-Instruct (real weights).
Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.common import machine  # noqa: E402
from deploy.cli import speculative_worker_args  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from tests.integration.conftest import scrape, value  # noqa: E402

CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
'''
PROMPTS = [
    "Rewrite this function with the variable `total` renamed to `acc`, changing nothing else:\n"
    + CODE + "\nHere is the function with `total` renamed to `acc`:\n",
    "Repeat the following list exactly: apples, pears, plums, cherries, grapes, figs, dates, "
    "limes, lemons, oranges.\nThe list repeated exactly: apples,",
    "Summarise in one sentence, reusing its words: The committee met on Tuesday to review the "
    "budget for the new library, and the committee agreed that the budget for the new library "
    "should grow by ten percent.\nSummary: The committee",
]
DEFAULT_CONFIG = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'


def sampling_for(kind: str, max_tokens: int, seed: int) -> pb.SamplingParams:
    """greedy, or seeded sampling (temperature 0.8, top-k 8: answers that still repeat)."""
    if kind == "greedy":
        return pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, top_k=8,
                             seed=seed)


def one(stub, prompt: str, sampling: pb.SamplingParams) -> tuple[list[int], float]:
    """(the ids, time per output token after the first) of one streamed request."""
    ids, stamps = [], []
    for msg in stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling), timeout=600):
        ids += msg.token_ids
        stamps += [time.perf_counter()] * len(msg.token_ids)
    return ids, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def measure(model: str, config: str, kind: str, max_tokens: int, batch: int, rounds: int,
            dtype: str = "auto") -> dict:
    args = ("--speculative-config", config) if config else ()
    # the workers get what `up` gives them of the config (graphs for K, the draft model)
    spec = MeshSpec(model=model, port=0, http_port=-1, scheduler_args=args,
                    worker_args=("--dtype", dtype, *speculative_worker_args(config)))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        one(stub, PROMPTS[0], sampling_for(kind, 4, 0))  # warm up
        before = scrape(mesh.metrics_url("replica-0-scheduler"))
        tpot, ids = [], []
        for r in range(rounds):
            for i, prompt in enumerate(PROMPTS):  # batch 1: one request at a time
                got, t = one(stub, prompt, sampling_for(kind, max_tokens, 100 * r + i))
                tpot.append(t)
                ids.append(got)
        after = scrape(mesh.metrics_url("replica-0-scheduler"))
        many = [(PROMPTS[i % len(PROMPTS)], sampling_for(kind, max_tokens, i))
                for i in range(batch)]
        start = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            total = sum(len(r[0]) for r in pool.map(lambda a: one(stub, *a), many))
        batch_rate = total / (time.perf_counter() - start)

    def moved(name):
        return value(after, name) - value(before, name)

    return dict(tpot_ms=statistics.median(tpot) * 1e3, ids=ids, batch_rate=batch_rate,
                drafts=moved("meshserve:spec_decode_num_drafts_total"),
                draft_tokens=moved("meshserve:spec_decode_num_draft_tokens_total"),
                accepted=moved("meshserve:spec_decode_num_accepted_tokens_total"),
                steps=moved("meshserve:steps_total"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="default: SmolLM2-135M-Instruct; tiny: the "
                   "tiny test model")
    p.add_argument("--dtype", default="auto", help="the workers' --dtype (auto: bfloat16 on GPUs)")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--configs", default=DEFAULT_CONFIG,
                   help="speculative configs to compare with none, separated by ';'")
    p.add_argument("--sampling", default="greedy,seeded", help="greedy and/or seeded")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if not a.model:
        from services.model import packaged_models

        a.model = str(packaged_models.ensure())
    elif a.model == "tiny":
        from services.model.default_model import ensure_default_model

        a.model = str(ensure_default_model())
    configs = [c.strip() for c in a.configs.split(";") if c.strip()]
    print(f"\n### n-gram speculation vs none ({Path(a.model).name}, {len(PROMPTS)} prompts x "
          f"{a.rounds} rounds x {a.tokens} tokens at batch 1; {a.batch} at once)\n")
    print(f"Machine: {machine()}; workers' dtype {a.dtype}\n")
    print("| sampling | speculative config | time per output token, batch 1 (median) | "
          f"tokens/s, batch 1 | steps at batch 1 | tokens/s, batch {a.batch} | accepted | "
          "tokens per verified step | vs none, batch 1 | vs none, batch "
          f"{a.batch} | batch-1 answers identical to none's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for kind in a.sampling.split(","):
        off = measure(a.model, "", kind, a.tokens, a.batch, a.rounds, a.dtype)
        print(f"| {kind} | none | {off['tpot_ms']:.2f} ms | {1e3 / off['tpot_ms']:.0f} | "
              f"{off['steps']:.0f} | {off['batch_rate']:.0f} | - | 1.00 | - | - | - |", flush=True)
        for config in configs:
            on = measure(a.model, config, kind, a.tokens, a.batch, a.rounds, a.dtype)
            rate = on["accepted"] / on["draft_tokens"] if on["draft_tokens"] else 0.0
            mean_len = 1 + on["accepted"] / on["drafts"] if on["drafts"] else 1.0
            print(f"| {kind} | `{config}` | {on['tpot_ms']:.2f} ms | {1e3 / on['tpot_ms']:.0f} | "
                  f"{on['steps']:.0f} | {on['batch_rate']:.0f} | {rate:.0%} | {mean_len:.2f} | "
                  f"{off['tpot_ms'] / on['tpot_ms']:.2f}x | "
                  f"{on['batch_rate'] / off['batch_rate']:.2f}x | "
                  f"{sum(x == y for x, y in zip(on['ids'], off['ids']))} of {len(off['ids'])} |",
                  flush=True)


if __name__ == "__main__":
    main()

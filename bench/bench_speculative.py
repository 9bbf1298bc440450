"""n-gram speculative decoding against none, side by side in one run: the same greedy requests
through a mesh without and with `--speculative-config`, at batch 1 (time per output token,
tokens/s) and at a larger batch (what speculation costs in throughput there), with the
acceptance the scheduler counted and a check that both give the same tokens.

    python bench/bench_speculative.py [--model DIR] [--tokens 96] [--batch 16]
        [--config '{"method": "ngram", "num_speculative_tokens": 4}'] [--rounds 2]

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


def one(stub, prompt: str, max_tokens: int) -> tuple[list[int], float]:
    """(the ids, time per output token after the first) of one streamed greedy request."""
    ids, stamps = [], []
    request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True))
    for msg in stub.Generate(request, timeout=600):
        ids += msg.token_ids
        stamps += [time.perf_counter()] * len(msg.token_ids)
    return ids, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def measure(model: str, config: str, max_tokens: int, batch: int, rounds: int) -> dict:
    args = ("--speculative-config", config) if config else ()
    spec = MeshSpec(model=model, port=0, http_port=-1, scheduler_args=args)
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        one(stub, PROMPTS[0], 4)  # warm up
        before = scrape(mesh.metrics_url("replica-0-scheduler"))
        tpot, ids = [], []
        for _ in range(rounds):
            for prompt in PROMPTS:  # batch 1: one request at a time
                got, t = one(stub, prompt, max_tokens)
                tpot.append(t)
                ids.append(got)
        after = scrape(mesh.metrics_url("replica-0-scheduler"))
        many = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        start = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            total = sum(len(r[0]) for r in pool.map(lambda p: one(stub, p, max_tokens), many))
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
    p.add_argument("--model", default="", help="default: SmolLM2-135M-Instruct")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if not a.model:
        from services.model import packaged_models

        a.model = str(packaged_models.ensure())
    off = measure(a.model, "", a.tokens, a.batch, a.rounds)
    on = measure(a.model, a.config, a.tokens, a.batch, a.rounds)
    same = off["ids"] == on["ids"]
    tokens = sum(len(i) for i in on["ids"])
    print(f"\n### n-gram speculation vs none ({Path(a.model).name}, greedy, {len(PROMPTS)} prompts x "
          f"{a.rounds} rounds x {a.tokens} tokens at batch 1; {a.batch} at once)\n")
    print(f"Machine: {machine()}; config {a.config}\n")
    print("| | time per output token, batch 1 (median) | tokens/s, batch 1 | steps at batch 1 "
          f"| tokens/s, batch {a.batch} |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("no speculation", off), ("n-gram", on)):
        print(f"| {name} | {r['tpot_ms']:.2f} ms | {1e3 / r['tpot_ms']:.0f} | {r['steps']:.0f} | "
              f"{r['batch_rate']:.0f} |")
    rate = on["accepted"] / on["draft_tokens"] if on["draft_tokens"] else 0.0
    mean_len = 1 + on["accepted"] / on["drafts"] if on["drafts"] else 1.0
    print(f"\nSpeedup at batch 1: {off['tpot_ms'] / on['tpot_ms']:.2f}x; at batch {a.batch}: "
          f"{on['batch_rate'] / off['batch_rate']:.2f}x. Proposals {on['draft_tokens']:.0f} in "
          f"{on['drafts']:.0f} steps of a sequence, accepted {on['accepted']:.0f} ({rate:.0%}), "
          f"{mean_len:.2f} tokens per verified step; {tokens} tokens at batch 1 took "
          f"{on['steps']:.0f} steps against {off['steps']:.0f}. Same tokens with and without: "
          f"{'yes' if same else 'NO'}.")


if __name__ == "__main__":
    main()

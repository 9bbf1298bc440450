"""Measures the split-KV decode attention kernel (services/model/triton_attention.py) at the
decode shapes it serves, its default launch (splits from the SM count, tile and warps of the
module) against every tile x warps x splits launch, and prints where the default stands.

    python bench/tune_attention.py [--shapes 1b,8b] [--batches 1,16,64] [--contexts 192,2048]

Each launch is timed as it runs in serving, inside a CUDA graph: a graph of (L2 flush, launch)
replayed, less a graph of the flush alone (a few-microsecond kernel timed from Python would time
its launch instead). Each candidate's output is checked against the default's first.
The KV bytes read per call over the time gives the bandwidth to compare with the GPU's copy
bandwidth. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.make_random_llama import SHAPES  # noqa: E402
from services.model import triton_attention  # noqa: E402

BLOCK_SIZE = 16  # the KV cache's positions per block (the scheduler's default)
MAX_MODEL_LEN = 8192  # block-table width as the worker sizes it


REPLAYS = 50
_FLUSH = None  # 256 MB written between launches: no K/V of the last one is left in L2


def _graph_us(fn) -> float:
    """Median over 5 timings of REPLAYS replays of a graph of (flush, fn), per replay."""
    flush = _FLUSH
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        flush.zero_(), fn()  # warm up off the default stream, as capture needs
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flush.zero_()
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPLAYS)
    return sorted(times)[2]


_FLUSH_US = None


def bench_us(fn) -> float:
    """fn's microseconds per launch inside a graph, with L2 flushed before each."""
    global _FLUSH, _FLUSH_US
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024**2 // 4, dtype=torch.int32, device="cuda")
        _FLUSH_US = _graph_us(lambda: None)
    return _graph_us(fn) - _FLUSH_US


def case(dims: dict, batch: int, context: int, layout: str = "nhd"):
    """(q, kv_cache, block_tables, seq_lens, kv bytes) for `batch` sequences of `context`
    positions on randomly placed blocks. layout "nhd": the cache as the worker keeps it, a
    block's slots each holding every KV head ([2, blocks, block_size, kv_heads, d]); "hnd": each
    KV head's slots of a block contiguous (stored [2, blocks, kv_heads, block_size, d], handed to
    the kernel as the same logical view with other strides)."""
    heads, kv_heads, d = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    width = MAX_MODEL_LEN // BLOCK_SIZE
    per_seq = -(-context // BLOCK_SIZE)
    blocks = torch.randperm(batch * per_seq + 1)[: batch * per_seq].view(batch, per_seq)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    tables[:, :per_seq] = blocks.int()
    if layout == "hnd":
        cache = torch.randn(2, batch * per_seq + 1, kv_heads, BLOCK_SIZE, d, dtype=torch.bfloat16,
                            device="cuda").transpose(2, 3)
    else:
        cache = torch.randn(2, batch * per_seq + 1, BLOCK_SIZE, kv_heads, d,
                            dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, cache, tables.cuda(), seq_lens, 2 * batch * context * kv_heads * d * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="192,2048")
    p.add_argument("--stages", default="default,1,2,3,4",
                   help="software-pipelining depths of the tile loop ('default': Triton's)")
    p.add_argument("--layouts", default="nhd", help="cache layouts to measure: nhd, hnd")
    p.add_argument("--tiles", default="16,32,64,128", help="positions per K/V tile to try")
    a = p.parse_args()
    a.stages = [None if s == "default" else int(s) for s in a.stages.split(",")]
    device = torch.cuda.get_device_name()
    print(f"\n### Decode attention launches on {device} (bf16, block size {BLOCK_SIZE}, L2 "
          "flushed, median us)\n")
    print("| shape | layout | batch | context | default us | default splits | default TB/s | default, 2 warps us "
          "| best us | best (tile, warps, splits, stages) | best TB/s | best / default |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for shape, layout, batch, context in itertools.product(
            a.shapes.split(","), a.layouts.split(","), map(int, a.batches.split(",")),
            map(int, a.contexts.split(","))):
        q, cache, tables, seq_lens, kv_bytes = case(SHAPES[shape], batch, context, layout)
        scale = q.shape[-1] ** -0.5
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count
        default_splits = triton_attention._default_num_splits(
            tables.shape[1] * BLOCK_SIZE, batch * cache.shape[3], num_sms)

        def run(splits=None, block_n=triton_attention._DECODE_TILE,
                warps=triton_attention._NUM_WARPS, stages=None):
            return triton_attention.paged_decode_attention(q, cache, tables, seq_lens, scale,
                                                           splits, block_n, warps, stages)

        expected = run().float()
        default_us = bench_us(run)
        two_warps_us = bench_us(lambda: run(warps=2))
        best = None
        for block_n, warps, splits, stages in itertools.product(
                map(int, a.tiles.split(",")), (2, 4), (1, 2, 4, 8, 16), a.stages):
            if splits > 1 and batch * cache.shape[3] * splits > 16 * num_sms:
                continue  # far past the SMs' programs: never the best, and slow to time
            try:
                got = run(splits, block_n, warps, stages).float()
            except Exception:  # noqa: BLE001 - a launch the GPU cannot hold is skipped
                continue
            if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2):
                print(f"  ({block_n}, {warps}, {splits}, {stages}) disagrees with the default: "
                      "skipped")
                continue
            us = bench_us(lambda: run(splits, block_n, warps, stages))
            if best is None or us < best[1]:
                best = ((block_n, warps, splits, stages), us)
        tb = kv_bytes / 1e12
        print(f"| {shape} | {layout} | {batch} | {context} | {default_us:.2f} | {default_splits} | "
              f"{tb / (default_us / 1e6):.2f} | {two_warps_us:.2f} | {best[1]:.2f} | {', '.join('default' if v is None else str(v) for v in best[0])} | "
              f"{tb / (best[1] / 1e6):.2f} | {best[1] / default_us:.2f} |", flush=True)


if __name__ == "__main__":
    main()

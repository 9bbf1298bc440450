"""Measures cuBLAS against the Triton skinny matmul (services/model/triton_linear.py) for every
weight product of the given model shapes at decode batch sizes, and writes the tiles that win
into the measured table (`services/model/linear_configs.json`) under this GPU's name.

    python bench/tune_linear.py [--shapes 1b,8b] [--models DIR,...] [--tp 1] [--write FILE]

Times are medians of CUDA-event timings, taken one of two ways (`--timing`):
- flush (the default): each call alone, the L2 cache flushed between calls
  (triton.testing.do_bench): a weight read from L2 would flatter a kernel that reads HBM in
  serving. A call of a few microseconds is then mostly its own launch and ramp.
- chain: the product back to back over distinct copies of its weight (more bytes than twice the
  L2 cache) inside one CUDA graph, the time per product; as a decode step runs its products:
  from HBM, each after the one before, with the PDL edges of the Triton launches.
A tile enters the table only if it is at least MARGIN faster than cuBLAS and its product
agrees with cuBLAS's within the dtype's rounding. Prints one markdown table.

At 2-64 rows it also tunes the products with an epilogue: gate/up with SiLU x up
(`--silu-rows`) and qkv with the rotary and the KV-cache write (`--rope-rows`), each against the
pair apart as the model runs it. At one row it then tunes the fused GEMVs
(services/model/triton_gemv.py): each product with the op that feeds it in the model (the
residual add + RMSNorm before qkv and gate_up, SiLU x mul before down) timed as one kernel
against the unfused pair as the model runs it (the op's Triton kernel, then the product on
whichever of cuBLAS and the skinny tile won above). A gemv tile
enters the table under `gemv-<prologue>,N,K,dtype` by the same margin and agreement rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.make_random_llama import SHAPES  # noqa: E402
from services.model import triton_gemv, triton_linear, triton_ops  # noqa: E402
from services.model.triton_linear import Tile  # noqa: E402

MARGIN = 0.97  # a tile must take at most 97 % of cuBLAS's time
VOCAB = 128256
DEVICE = "cuda"  # where the products are timed


def products(dims: dict, tp: int = 1, vocab: int = VOCAB) -> dict[str, tuple[int, int]]:
    """(N, K) of each weight on one TP rank: qkv, o, gate_up, down, lm_head."""
    hidden, inter, d = dims["hidden_size"], dims["intermediate_size"], dims["head_dim"]
    heads, kv_heads = dims["num_attention_heads"], dims["num_key_value_heads"]
    kv_per_rank = max(1, kv_heads // tp)
    return {
        "qkv_proj": ((heads // tp + 2 * kv_per_rank) * d, hidden),
        "o_proj": (hidden, heads * d // tp),
        "gate_up_proj": (2 * inter // tp, hidden),
        "down_proj": (hidden, inter // tp),
        "lm_head": (-(-vocab // tp), hidden),
    }


ALL_SPLITS = False  # --all-splits


def candidates(n: int, k: int, num_sms: int) -> list[Tile]:
    """Tiles worth timing: each N tile with and without the split of K that fills the GPU;
    ALL_SPLITS: every power-of-two split up to 16 that keeps at most 8 programs per SM (a split
    costs no second kernel: the last split of a column tile sums them)."""
    if ALL_SPLITS:
        return [Tile(block_n, block_k, s, 4 if block_k <= 128 else 3)
                for block_n in (16, 32, 64) for block_k in (128, 256)
                for s in (1, 2, 4, 8, 16)
                if k % (block_k * s) == 0 and -(-n // block_n) * s <= 8 * num_sms]
    out = []
    for block_n in (16, 32, 64, 128):
        for block_k in (64, 128, 256):
            stages = 4 if block_k <= 128 else 3
            programs, split = -(-n // block_n), 1
            while programs * split < num_sms and split < 8:
                split *= 2
            for s in sorted({1, split}):
                if k % (block_k * s) == 0:
                    out.append(Tile(block_n, block_k, s, stages))
    return out


# the op fused into each product at batch 1, as the decoder layer applies them (layers.norm_linear)
GEMV_PROLOGUES = {"qkv_proj": "add_rms_norm", "o_proj": "none", "gate_up_proj": "add_rms_norm",
                  "down_proj": "silu_mul", "lm_head": "none"}


def gemv_candidates(k: int) -> list[Tile]:
    """Batch-1 tiles worth timing: rows per program x K step x warps x stages."""
    return [Tile(block_n, block_k, 1, stages, warps)
            for block_n in (4, 8, 16, 32) for block_k in (128, 256, 512) if k % block_k == 0
            for warps in (4, 8) for stages in (1, 2)]


TIMING = "flush"  # or "chain" (--timing)
CHAIN_REPLAYS = 20


def bench_us(fn, w: torch.Tensor) -> float:
    """Median microseconds of fn(w) (fn: the product on weight w), as TIMING says."""
    if TIMING == "chain":
        return chain_us(fn, w)
    from triton.testing import do_bench

    return do_bench(lambda: fn(w), warmup=5, rep=20, return_mode="median") * 1e3


def chain_us(fn, w: torch.Tensor) -> float:
    """Microseconds per product of fn over distinct copies of w, back to back in one CUDA graph."""
    weights = _copies(w)
    fn(w)  # compiles a Triton tile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for copy in weights:
            fn(copy)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(CHAIN_REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    del graph
    return sorted(times)[len(times) // 2]


_COPIES: dict = {}


def _copies(w: torch.Tensor) -> list[torch.Tensor]:
    """w and copies of it, together over twice the L2 cache (at least 4): each product of a
    chain reads its weight from HBM. Kept for the weight last asked about."""
    key = (w.data_ptr(), tuple(w.shape))
    if key not in _COPIES:
        _COPIES.clear()
        l2 = torch.cuda.get_device_properties(w.device).L2_cache_size
        count = max(4, -(-2 * l2 // (w.numel() * w.element_size())))
        _COPIES[key] = [w] + [w.clone() for _ in range(count - 1)]
    return _COPIES[key]


def baseline_us(fn, w: torch.Tensor) -> float:
    """The baseline a tile must beat: the best of three medians, so that one slow measurement
    of the baseline (seen: a pair timed at 2.5x its time at the next row count) cannot let a
    tile into the table."""
    return min(bench_us(fn, w) for _ in range(3))


def tune_one(n: int, k: int, rows: int, dtype: torch.dtype, out_dtype, num_sms: int):
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    cublas = baseline_us(lambda w: F.linear(x, w).to(out_dtype or dtype), w)
    expected = F.linear(x, w).float()
    best = best_tile(candidates(n, k, num_sms),
                     lambda w, t: triton_linear.skinny_matmul(x, w, t, out_dtype), w,
                     lambda got: torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2),
                     f"cuBLAS's {n}x{k}")
    return cublas, best


def best_tile(tiles, run, w: torch.Tensor, agrees, against: str):
    """The fastest (tile, us) of tiles, run(w, tile) timed by bench_us, among those whose output
    agrees (agrees(output)) with the baseline named against; None if none does."""
    best = None
    for tile in tiles:
        try:
            got = run(w, tile)
        except Exception:  # noqa: BLE001 - a tile the GPU cannot hold (shared memory) is skipped
            continue
        if not agrees(got):
            print(f"  tile {tile} disagrees with {against}: skipped", flush=True)
            continue
        us = bench_us(lambda w, t=tile: run(w, t), w)
        if best is None or us < best[1]:
            best = (tile, us)
    return best


def tune_gemv(name: str, n: int, k: int, dtype: torch.dtype, out_dtype, product):
    """(unfused us, best (tile, us) or None) for product `name` at one row; product(x, w) is the
    unfused product as the model would run it after the op."""
    prologue = GEMV_PROLOGUES[name]
    width = 2 * k if prologue == "silu_mul" else k
    x = torch.randn(1, width, device=DEVICE, dtype=dtype)
    residual = torch.randn_like(x) if prologue == "add_rms_norm" else None
    norm_w = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    eps = 1e-5

    def unfused(w):
        if prologue == "add_rms_norm":
            xin, _ = triton_ops.fused_add_rms_norm(x, residual, norm_w, eps)
        elif prologue == "silu_mul":
            xin = triton_ops.silu_and_mul(x)
        else:
            xin = x
        return product(xin, w)

    def fused(w, tile):
        return triton_gemv.gemv(x, w, tile, prologue, residual, norm_w, eps, out_dtype)

    expected, h = unfused(w).float(), (x + residual) if residual is not None else None

    def agrees(got) -> bool:
        y, h_got = got
        return torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2) and (
            h is None or torch.equal(h_got, h))

    best = best_tile(gemv_candidates(k), fused, w, agrees,
                     f"the unfused pair on {name} {n}x{k}")
    return baseline_us(unfused, w), best


def silu_candidates(k: int) -> list[Tile]:
    """gate/up + SiLU x up tiles worth timing: columns of each half x K step x stages x warps."""
    return [Tile(block_n, block_k, 1, stages, warps)
            for block_n in (32, 64, 128) for block_k in (64, 128) if k % block_k == 0
            for stages in (3, 4) for warps in (4, 8)]


def tune_gate_up_silu(n: int, k: int, rows: int, dtype: torch.dtype, product):
    """(unfused us, best (tile, us) or None) for the gate/up product [n = 2I, k] with SiLU x up
    fused, against the pair as the model runs it: product(x, w) (cuBLAS or its skinny tile),
    then the SiLU x up kernel."""
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5

    def unfused(w):
        return triton_ops.silu_and_mul(product(x, w))

    expected = unfused(w).float()
    best = best_tile(silu_candidates(k), lambda w, t: triton_linear.gate_up_silu(x, w, t), w,
                     lambda got: torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2),
                     f"the gate/up + SiLU pair on {n}x{k}")
    return baseline_us(unfused, w), best


def rope_candidates(k: int, head_dim: int) -> list[Tile]:
    """qkv + rotary tiles worth timing: rotation pairs per program (a part of a head up to a few
    heads) x K step x stages x warps."""
    half = head_dim // 2
    return [Tile(pairs, block_k, 1, stages, warps)
            for pairs in (16, 32, 64, 128, 256) if half % pairs == 0 or pairs % half == 0
            for block_k in (64, 128) if k % block_k == 0
            for stages in (3, 4) for warps in (4, 8)]


def tune_qkv_rope(dims: dict, n: int, k: int, rows: int, dtype: torch.dtype, product):
    """(unfused us, best (tile, us) or None) for the qkv product [n, k] with the rotary and the
    KV-cache write fused, against the pair as the model runs it: product(x, w) (cuBLAS or its
    skinny tile), then the rotary + cache kernel."""
    heads, kv_heads, d = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    angles = torch.randn(rows, d // 2, device=DEVICE)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    cache = torch.zeros(2, rows, 16, kv_heads, d, device=DEVICE, dtype=dtype)
    slots = torch.arange(rows, device=DEVICE) * 16  # one block per row, as sequences hold them

    def unfused(w):
        qkv = product(x, w)
        triton_ops.rotary_and_cache(qkv, cos, sin, cache, slots, heads, kv_heads, d)
        return qkv[:, :heads * d].reshape(rows, heads, d)

    def fused(w, tile):
        return triton_linear.qkv_rope(x, w, cos, sin, cache, slots, heads, kv_heads, d, tile)

    expected = unfused(w).float()
    best = best_tile(rope_candidates(k, d), fused, w,
                     lambda got: torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2),
                     f"the qkv + rotary pair on {n}x{k}")
    return baseline_us(unfused, w), best


def _record(entries: dict, key: str, best, baseline: float) -> bool:
    """Puts best's tile in the table under key if it took at most MARGIN of the baseline's time
    (us), else takes the key out; returns whether it went in."""
    chosen = best is not None and best[1] <= MARGIN * baseline
    if chosen:
        entries[key] = best[0].as_list()
    else:
        entries.pop(key, None)
    return chosen


def _fused_cells(best, unfused_us: float, n: int, k: int) -> str:
    """A fused kernel's row cells: its us, its tile (n, k, stages, warps), its TB/s on the
    [n, k] bf16 weight, its time / the unfused pair's; "-" in each without one."""
    if best is None:
        return " | ".join(["-"] * 4)
    tile, us = best
    tile_text = f"{tile.block_n}, {tile.block_k}, {tile.num_stages}, {tile.num_warps}"
    return " | ".join([f"{us:.1f}", tile_text, f"{n * k * 2 / 1e12 / (us / 1e6):.2f}",
                       f"{us / unfused_us:.2f}"])


def _per_rank(dims: dict, tp: int) -> dict:
    """The attention's heads on one TP rank (what the qkv product holds there)."""
    return dict(dims, num_attention_heads=dims["num_attention_heads"] // tp,
                num_key_value_heads=max(1, dims["num_key_value_heads"] // tp))


def _out_dtype(name: str, tp: int):
    """The LM head's logits in float32 when one rank holds them all, as the model asks."""
    return torch.float32 if name == "lm_head" and tp == 1 else None


def _product(tile: Tile | None, out_dtype):
    """x, w -> x wᵀ on the skinny tile, or on cuBLAS where tile is None."""
    if tile is None:
        return lambda x, w: F.linear(x, w).to(out_dtype or x.dtype)
    return lambda x, w: triton_linear.skinny_matmul(x, w, tile, out_dtype)


def _write(path: Path, table: dict, device: str, entries: dict) -> None:
    table[device] = dict(sorted(entries.items()))
    path.write_text(table_text(table))


def table_text(table: dict) -> str:
    """The table as JSON with one line per entry (reviewable diffs)."""
    devices = []
    for device, entries in table.items():
        if isinstance(entries, str):  # another GPU's tiles (an alias)
            devices.append(f" {json.dumps(device)}: {json.dumps(entries)}")
            continue
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in entries.items())
        devices.append(f" {json.dumps(device)}: {{\n{rows}\n }}")
    return "{\n" + ",\n".join(devices) + "\n}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--models", default="", help="checkpoint directories (config.json) as well")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rows", default=",".join(map(str, triton_linear.ROW_CLASSES)))
    p.add_argument("--silu-rows", default="16,32,64",
                   help="row counts at which gate/up with SiLU x up fused is tuned ('' for none)")
    p.add_argument("--rope-rows", default="16,32,64",
                   help="row counts at which qkv with the rotary and cache write fused is tuned "
                        "('' for none)")
    p.add_argument("--swapped-rows", default="",
                   help="also time cuBLAS on the swapped product (W Xᵀ)ᵀ at these row counts, "
                        "alone and with the copy back to rows (nothing is written for it)")
    p.add_argument("--timing", choices=("flush", "chain"), default="flush",
                   help="each call alone with L2 flushed, or back to back over copies of the "
                        "weight in one CUDA graph (see above)")
    p.add_argument("--products", default="qkv_proj,o_proj,gate_up_proj,down_proj,lm_head",
                   help="which products to tune")
    p.add_argument("--all-splits", action="store_true",
                   help="time every power-of-two split of K up to 16, not only the one that "
                        "fills the GPU")
    p.add_argument("--write", default=str(triton_linear.CONFIG_FILE))
    a = p.parse_args()
    global TIMING, ALL_SPLITS
    TIMING, ALL_SPLITS = a.timing, a.all_splits
    wanted = set(a.products.split(","))
    timing = "L2 flushed" if TIMING == "flush" else "chained in a CUDA graph"
    dims_of = {s: _per_rank(SHAPES[s], a.tp) for s in a.shapes.split(",") if s}
    shapes = {s: products(SHAPES[s], a.tp) for s in a.shapes.split(",") if s}
    for model in filter(None, a.models.split(",")):
        from services.model.config import ModelConfig

        c = ModelConfig.from_dir(model)
        dims = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    head_dim=c.head_dim, num_attention_heads=c.num_attention_heads,
                    num_key_value_heads=c.num_key_value_heads)
        shapes[Path(model).name] = products(dims, a.tp, c.vocab_size)
        dims_of[Path(model).name] = _per_rank(dims, a.tp)
    device = torch.cuda.get_device_name()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    path = Path(a.write)
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.get(device)
    entries = entries if isinstance(entries, dict) else {}  # a measured table replaces an alias
    print(f"\n### Skinny matmuls vs cuBLAS on {device} (bf16, {timing}, median us)\n")
    print("| shape | product | N x K | rows | cuBLAS us | Triton us | tile (n, k, split, stages) "
          "| cuBLAS TB/s | Triton TB/s | chosen |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---|")
    winners = {}  # (shape, product) -> the batch-1 product as the model runs it unfused
    for shape, prods in shapes.items():
        for name, (n, k) in prods.items():
            if name not in wanted:
                continue
            out_dtype = _out_dtype(name, a.tp)
            for rows in (int(r) for r in a.rows.split(",") if r):
                cublas, best = tune_one(n, k, rows, torch.bfloat16, out_dtype, num_sms)
                chosen = _record(entries, triton_linear.table_key(rows, n, k, torch.bfloat16),
                                 best, cublas)
                _write(path, table, device, entries)
                if rows == 1:
                    winners[shape, name] = _product(best[0] if chosen else None, out_dtype)
                gb = n * k * 2 / 1e12
                tile = best[0] if best else None
                tile_text = f"{tile.block_n}, {tile.block_k}, {tile.split_k}, {tile.num_stages}" \
                    if tile else "-"
                triton_us = f"{best[1]:.1f}" if best else "-"
                triton_bw = f"{gb / (best[1] / 1e6):.2f}" if best else "-"
                print(f"| {shape} | {name} | {n} x {k} | {rows} | {cublas:.1f} | {triton_us} | "
                      f"{tile_text} | {gb / (cublas / 1e6):.2f} | {triton_bw} | "
                      f"{'Triton' if chosen else 'cuBLAS'} |", flush=True)
    if winners:
        print(f"\n### Fused batch-1 GEMVs vs the unfused pair on {device} (bf16, {timing}, "
              "median us)\n")
        print("| shape | product | prologue | N x K | unfused us | fused us | tile (n, k, stages, "
              "warps) | fused TB/s | ratio | chosen |")
        print("|---|---|---|---|---:|---:|---|---:|---:|---|")
    for (shape, name), product in winners.items():
        n, k = shapes[shape][name]
        unfused, best = tune_gemv(name, n, k, torch.bfloat16, _out_dtype(name, a.tp), product)
        prologue = GEMV_PROLOGUES[name]
        chosen = _record(entries, triton_gemv.table_key(prologue, n, k, torch.bfloat16), best,
                         unfused)
        _write(path, table, device, entries)  # a run cut short keeps what it measured
        print(f"| {shape} | {name} | {prologue} | {n} x {k} | {unfused:.1f} | "
              f"{_fused_cells(best, unfused, n, k)} | {'fused' if chosen else 'unfused'} |",
              flush=True)
    def epilogue_section(title: str, product: str, tile_head: str, rows_list, tune, key_of):
        """One fused-epilogue kernel against the pair apart, for product at each row count:
        tune(shape, n, k, rows, pair) -> (the pair's us, best (tile, us) or None)."""
        if rows_list:
            print(f"\n### {title} vs the pair apart on {device} (bf16, {timing}, median us)\n")
            print(f"| shape | N x K | rows | unfused us | fused us | tile ({tile_head}, k, stages, "
                  "warps) | fused TB/s | ratio | chosen |")
            print("|---|---|---:|---:|---:|---|---:|---:|---|")
        for shape, prods in shapes.items():
            n, k = prods[product]
            for rows in rows_list:
                tile = entries.get(triton_linear.table_key(rows, n, k, torch.bfloat16))
                pair = _product(Tile(*tile) if tile else None, None)  # as the model runs it
                unfused, best = tune(shape, n, k, rows, pair)
                chosen = _record(entries, key_of(rows, n, k, torch.bfloat16), best, unfused)
                _write(path, table, device, entries)
                print(f"| {shape} | {n} x {k} | {rows} | {unfused:.1f} | "
                      f"{_fused_cells(best, unfused, n, k)} | "
                      f"{'fused' if chosen else 'unfused'} |", flush=True)

    epilogue_section(
        "gate/up with SiLU x up fused", "gate_up_proj", "n",
        [int(r) for r in a.silu_rows.split(",") if r],
        lambda shape, n, k, rows, pair: tune_gate_up_silu(n, k, rows, torch.bfloat16, pair),
        triton_linear.silu_table_key)
    epilogue_section(
        "qkv with the rotary and cache write fused", "qkv_proj", "pairs",
        [int(r) for r in a.rope_rows.split(",") if r],
        lambda shape, n, k, rows, pair: tune_qkv_rope(dims_of[shape], n, k, rows,
                                                      torch.bfloat16, pair),
        triton_linear.rope_table_key)
    swapped_rows = [int(r) for r in a.swapped_rows.split(",") if r]
    if swapped_rows:
        print(f"\n### cuBLAS on X Wᵀ against the swapped (W Xᵀ)ᵀ on {device} (bf16, {timing}, "
              "median us)\n")
        print("| shape | product | N x K | rows | X Wᵀ us | W Xᵀ us | W Xᵀ + copy to rows us |")
        print("|---|---|---|---:|---:|---:|---:|")
    for shape, prods in shapes.items():
        for name, (n, k) in prods.items():
            for rows in swapped_rows:
                x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
                w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
                plain = bench_us(lambda w: F.linear(x, w), w)
                swapped = bench_us(lambda w: torch.mm(w, x.t()), w)
                copied = bench_us(lambda w: torch.mm(w, x.t()).t().contiguous(), w)
                print(f"| {shape} | {name} | {n} x {k} | {rows} | {plain:.1f} | {swapped:.1f} | "
                      f"{copied:.1f} |", flush=True)
    _write(path, table, device, entries)
    print(f"\nwrote {len(entries)} entries for {device} to {path}")


if __name__ == "__main__":
    main()

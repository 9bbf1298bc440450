"""Skinny matmuls in Triton: Y = X Wᵀ for decode batches of at most 64 rows, where a measured
table says the kernel beats cuBLAS on this GPU.

At batch 1 a decode step is a chain of matrix-vector products, and cuBLAS runs the small ones
(Llama-1B's o_proj, 8 MB) at a third of the memory bandwidth: a kernel tuned for the shape, with
enough programs in flight to fill the GPU, reads the weight closer to the bandwidth. Which
kernel wins depends on the GPU and the shape, so the choice is data: `linear_configs.json` maps
a device name and (rows class, N, K) to a tile, and holds only the shapes where the Triton tile
measured faster than cuBLAS (`bench/tune_linear.py` measures and writes it). A shape it does not
hold runs on cuBLAS; a given GPU and checkpoint therefore always run the same kernels, so a
replica that takes over a stream computes what the first one did. A device may name another
device instead of holding tiles: the H100 SXM runs the H200's (the same GH100 chip, 132 SMs and
50 MB of L2; only its memory is slower) until a table measured on an H100 takes their place.

    grid (cdiv(N, BLOCK_N), SPLIT_K): one program computes Y[:, n-tile] over K / SPLIT_K of K;
    BLOCK_M (16, 32 or 64) covers every row of X (tl.dot needs 16 at least; padding rows are 0).
    SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N]; the last split of each n-tile to finish
    sums and rounds them (no second kernel, whose launch cost ~2 us a product at 64 rows).

The MLP's gate/up product has a second form with SiLU x up in its epilogue (`gate_up_silu`):
a program holds the gate tile and the up tile of the same columns (rows n and n + I of the merged
weight [gate | up]) and writes silu(gate) ⊙ up [M, I] directly, so the [M, 2I] product never
round-trips memory and the SiLU kernel's launch is gone. It rounds where the unfused pair rounds
(gate and up to the model's dtype, silu(gate), then the product). Its tiles sit in the same table
under `silu-<rows class>,2I,K,dtype`.

The attention's qkv product has a form with the rotary embedding and the KV-cache write in its
epilogue (`qkv_rope`): a program holds PAIRS rotation pairs of [q | k | v] heads as two
accumulators, columns of the first and of the second half of the heads (a part of one head or
several whole ones), which is what the rotation pairs; it writes
the rotated q heads to q, and the rotated k heads and the v heads to the cache at each row's
slot. It rounds where the unfused pair rounds (the product to the model's dtype, then the
rotation in float32, rounded). Its tiles sit under `rope-<rows class>,N,K,dtype`, with PAIRS in
the tile's block_n.

Accumulation is float32 on tensor cores (exact products for float32 inputs): the result differs
from cuBLAS's in the order of the sum only, within the dtype's rounding.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from services.model import triton_pdl
from services.model.triton_pdl import pdl_begin

MAX_ROWS = 64  # past this a step is a real GEMM and cuBLAS's tiles are the right ones
ROW_CLASSES = (1, 16, 32, 64)  # a table entry serves every row count up to its class
SHIPPED_CONFIG_FILE = Path(__file__).with_name("linear_configs.json")
# MESHSERVE_LINEAR_CONFIGS: a table measured on a deployment's own GPUs (bench/tune_linear.py
# --write FILE) in place of the shipped one
CONFIG_FILE = Path(os.environ.get("MESHSERVE_LINEAR_CONFIGS") or SHIPPED_CONFIG_FILE)


@dataclass(frozen=True)
class Tile:
    block_n: int
    block_k: int
    split_k: int = 1
    num_stages: int = 3
    num_warps: int = 4

    def as_list(self) -> list[int]:
        return [self.block_n, self.block_k, self.split_k, self.num_stages, self.num_warps]


def row_class(num_rows: int) -> int:
    return next(c for c in ROW_CLASSES if num_rows <= c)


def block_m(num_rows: int) -> int:
    return max(16, triton.next_power_of_2(num_rows))


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, partial_ptr, tickets_ptr, M, N, K, stride_xm, stride_wn,
                   stride_ym, max_ptr, argmax_ptr, num_valid,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ARGMAX: tl.constexpr,
                   PDL: tl.constexpr):
    """Y[:, n-tile] = X W[n-tile]ᵀ; K is a multiple of BLOCK_K · SPLIT_K. SPLIT_K > 1: program
    (n-tile, split) writes X[:, k-range] W[n-tile, k-range]ᵀ to partial [SPLIT_K, M, N] (float32),
    and the split of the n-tile that finishes last (a ticket per n-tile, as the split decode
    attention takes them) sums the partials in split order and writes Y.
    ARGMAX (one split): also each row's maximum over the tile's first num_valid columns and the
    first column holding it, to max / argmax [M, tiles] (NaN counts as the largest, as in
    torch.argmax)."""
    pdl_begin(PDL)
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = split * BLOCK_K + tl.arange(0, BLOCK_K)
    x_offsets = rm[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]
    row_ok, col_ok = rm[:, None] < M, rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, K, BLOCK_K * SPLIT_K):
        x = tl.load(x_ptr + x_offsets, mask=row_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_offsets += BLOCK_K * SPLIT_K
        w_ptrs += BLOCK_K * SPLIT_K
    out_ok = row_ok & (rn[None, :] < N)
    tile = rm[:, None] * N + rn[None, :]  # [BLOCK_M, BLOCK_N] in an [M, N] partial
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_ok)
    else:
        tl.store(partial_ptr + split * M * N + tile, acc, mask=out_ok)
        # Every thread's stores, then one gpu-scope acq_rel ticket: the last split sees them all.
        tl.debug_barrier()
        if tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in tl.static_range(SPLIT_K):  # through L2 (.cg): other SMs wrote them
                total += tl.load(partial_ptr + s * M * N + tile, mask=out_ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :],
                     total.to(y_ptr.dtype.element_ty), mask=out_ok)
            tl.store(tickets_ptr + pid_n, 0)  # zero again for the next launch
    if ARGMAX:  # of the values stored: y is float32 here
        valid = rn[None, :] < num_valid
        a = tl.where(valid, acc, float("-inf"))
        a = tl.where(a != a, float("inf"), a)
        best = tl.max(a, 1)  # [BLOCK_M]
        first = tl.min(tl.where((a == best[:, None]) & valid, rn[None, :], num_valid), 1)
        num_tiles = tl.num_programs(0)
        tl.store(max_ptr + rm * num_tiles + pid_n, best, mask=rm < M)
        tl.store(argmax_ptr + rm * num_tiles + pid_n, first, mask=rm < M)


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, y_ptr, M, I, K, stride_xm, stride_wn, stride_ym,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Y[:, n-tile] = silu(X W[n-tile]ᵀ) ⊙ (X W[I + n-tile]ᵀ) for W [2I, K] = [gate | up]."""
    pdl_begin(PDL)
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_offsets = rm[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    gate_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]
    up_ptrs = w_ptr + (rn.to(tl.int64) + I)[:, None] * stride_wn + rk[None, :]
    row_ok, col_ok = rm[:, None] < M, rn[:, None] < I
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + x_offsets, mask=row_ok, other=0.0)
        acc_gate = tl.dot(x, tl.trans(tl.load(gate_ptrs, mask=col_ok, other=0.0)), acc_gate,
                          input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, tl.trans(tl.load(up_ptrs, mask=col_ok, other=0.0)), acc_up,
                        input_precision=DOT_PRECISION)
        x_offsets += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    dtype = y_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    y = silu * acc_up.to(dtype).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(dtype),
             mask=row_ok & (rn[None, :] < I))


@triton.jit
def _qkv_rope_kernel(x_ptr, w_ptr, q_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, M, K,
                     stride_xm, stride_wn, stride_qm, stride_kv, num_heads, num_kv_heads,
                     BLOCK_M: tl.constexpr, PAIRS: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Rotation pairs [pid · PAIRS, (pid + 1) · PAIRS) (HALF to a head) of X W [(heads + 2
    kv_heads) · 2 HALF, K]ᵀ, q heads then k then v: q and k rotated by cos/sin [M, 2 HALF]
    (c, c), q stored to q_ptr [M, heads · 2 HALF], k and v to the cache at slot[row]
    (stride_kv: K to V)."""
    pdl_begin(PDL)
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    pair = pid * PAIRS + tl.arange(0, PAIRS)
    head = pair // HALF  # each pair's head among q, k, v
    j = pair % HALF  # its column in the head's first half (and HALF on, in the second)
    row_ok = rm[:, None] < M
    head_ok = head < num_heads + 2 * num_kv_heads
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    first = w_ptr + (head * (2 * HALF) + j).to(tl.int64)[:, None] * stride_wn + rk[None, :]
    second = first + HALF * stride_wn  # [PAIRS, BLOCK_K] each
    acc1 = tl.zeros((BLOCK_M, PAIRS), tl.float32)
    acc2 = tl.zeros((BLOCK_M, PAIRS), tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok, other=0.0)
        acc1 = tl.dot(x, tl.trans(tl.load(first, mask=head_ok[:, None], other=0.0)), acc1,
                      input_precision=DOT_PRECISION)
        acc2 = tl.dot(x, tl.trans(tl.load(second, mask=head_ok[:, None], other=0.0)), acc2,
                      input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        first += BLOCK_K
        second += BLOCK_K
    dtype = q_ptr.dtype.element_ty
    x1, x2 = acc1.to(dtype).to(tl.float32), acc2.to(dtype).to(tl.float32)
    cos = tl.load(cos_ptr + rm[:, None] * (2 * HALF) + j[None, :], mask=row_ok,
                  other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + rm[:, None] * (2 * HALF) + j[None, :], mask=row_ok,
                  other=0.0).to(tl.float32)
    rotated = (head < num_heads + num_kv_heads)[None, :]  # q and k; v as it is
    r1 = tl.where(rotated, x1 * cos - x2 * sin, x1).to(dtype)
    r2 = tl.where(rotated, x2 * cos + x1 * sin, x2).to(dtype)
    is_q = row_ok & (head < num_heads)[None, :]
    q_dst = q_ptr + rm[:, None] * stride_qm + (head * (2 * HALF) + j)[None, :]
    tl.store(q_dst, r1, mask=is_q)
    tl.store(q_dst + HALF, r2, mask=is_q)
    slot = tl.load(slot_ptr + rm, mask=rm < M, other=0).to(tl.int64)
    kv = tl.maximum(head - num_heads, 0)  # k heads 0 .. kv_heads - 1, then the v heads
    is_v = kv >= num_kv_heads
    kv = tl.where(is_v, kv - num_kv_heads, kv)
    dst = (cache_ptr + slot[:, None] * (num_kv_heads * 2 * HALF)
           + (kv * (2 * HALF) + j + tl.where(is_v, stride_kv, 0))[None, :])
    is_kv = row_ok & ((head >= num_heads) & head_ok)[None, :]
    tl.store(dst, r1, mask=is_kv)
    tl.store(dst + HALF, r2, mask=is_kv)


_MAX_TICKETS = 1 << 16  # n-tiles of one split product


def _tickets(device: torch.device, num_tiles: int) -> torch.Tensor:
    """The split products' arrival counters on device, one per n-tile, zero between launches
    (each launch's last splits reset theirs)."""
    if num_tiles > _MAX_TICKETS:
        raise ValueError(f"a split product of {num_tiles} column tiles; at most {_MAX_TICKETS}")
    return _ticket_buffer(device)


@functools.cache
def _ticket_buffer(device: torch.device) -> torch.Tensor:
    """Allocated by the first split product, which runs eagerly before any CUDA graph is
    captured (a graph then keeps using this same memory)."""
    return torch.zeros(_MAX_TICKETS, dtype=torch.int32, device=device)


def fits(x: torch.Tensor, weight: torch.Tensor, tile: Tile) -> bool:
    """Whether the kernel runs this shape as the tile asks (K divides into its steps)."""
    k = weight.shape[1]
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.shape[1] == k
            and k % (tile.block_k * tile.split_k) == 0 and x.stride(1) == 1
            and weight.stride(1) == 1 and x.dtype == weight.dtype)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, tile: Tile,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K] (M <= 64) -> x weightᵀ [M, N] in out_dtype (default x's)."""
    return _skinny(x, weight, tile, out_dtype)


class _Argmax(NamedTuple):
    """Where _skinny_kernel's ARGMAX epilogue writes: each row's maximum and first column per
    column tile [M, tiles], over the first num_valid columns."""

    maxima: torch.Tensor
    firsts: torch.Tensor
    num_valid: int


def _skinny(x, weight, tile, out_dtype, argmax: _Argmax | None = None) -> torch.Tensor:
    """Y of one _skinny_kernel launch."""
    if not fits(x, weight, tile):
        raise ValueError(f"skinny_matmul: x {tuple(x.shape)}, weight {tuple(weight.shape)} do not "
                         f"fit tile {tile}")
    m, k = x.shape
    n = weight.shape[0]
    out_dtype = out_dtype or x.dtype
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    grid = (triton.cdiv(n, tile.block_n), tile.split_k)
    partial = y if tile.split_k == 1 else torch.empty((tile.split_k, m, n), dtype=torch.float32,
                                                       device=x.device)
    tickets = y if tile.split_k == 1 else _tickets(x.device, grid[0])
    argmax_args = (y, y, 0) if argmax is None else argmax
    _skinny_kernel[grid](
        x, weight, y, partial, tickets, m, n, k, x.stride(0), weight.stride(0), n, *argmax_args,
        BLOCK_M=block_m(m), BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        SPLIT_K=tile.split_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ARGMAX=argmax is not None,
        num_stages=tile.num_stages, num_warps=tile.num_warps, **triton_pdl.kwargs(x.device))
    return y


def skinny_matmul_argmax(x: torch.Tensor, weight: torch.Tensor, tile: Tile, num_valid: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K], weight [N, K] (M <= 64, a tile of one split) -> (x weightᵀ [M, N] float32, [M]
    int64 each row's torch.argmax over its first num_valid columns): the LM head with the greedy
    ids in its epilogue, so no kernel reads the logits back for them (a second, one program per
    row, picks among the tiles' maxima)."""
    from services.model.triton_ops import argmax_of_chunks

    if tile.split_k != 1 or not fits(x, weight, tile) or not 0 < num_valid <= weight.shape[0]:
        raise ValueError(f"skinny_matmul_argmax: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         f", {num_valid} valid columns do not fit tile {tile}")
    m = x.shape[0]
    ids = torch.empty(m, dtype=torch.int64, device=x.device)
    num_tiles = triton.cdiv(weight.shape[0], tile.block_n)
    argmax = _Argmax(torch.empty((m, num_tiles), dtype=torch.float32, device=x.device),
                     torch.empty((m, num_tiles), dtype=torch.int32, device=x.device), num_valid)
    y = _skinny(x, weight, tile, torch.float32, argmax)
    if m:
        argmax_of_chunks(argmax.maxima, argmax.firsts, ids, num_valid)
    return y, ids


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, tile: Tile) -> torch.Tensor:
    """x [M, K], weight [2I, K] = [gate | up] (M <= 64) -> silu(x gateᵀ) ⊙ (x upᵀ) [M, I]."""
    if not fits_gate_up_silu(x, weight, tile):
        raise ValueError(f"gate_up_silu: x {tuple(x.shape)}, weight {tuple(weight.shape)} do not "
                         f"fit tile {tile}")
    m, k = x.shape
    inter = weight.shape[0] // 2
    y = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    if m:
        _gate_up_silu_kernel[(triton.cdiv(inter, tile.block_n),)](
            x, weight, y, m, inter, k, x.stride(0), weight.stride(0), inter,
            BLOCK_M=block_m(m), BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_stages=tile.num_stages, num_warps=tile.num_warps, **triton_pdl.kwargs(x.device))
    return y


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
             num_kv_heads: int, head_dim: int, tile: Tile) -> torch.Tensor:
    """x [M, K], weight [(heads + 2 kv_heads) · d, K] (M <= 64), cos/sin [M, d] -> q [M, heads,
    d] rotated; this step's k (rotated) and v written to kv_cache [2, blocks, block_size,
    kv_heads, d] at flat slot slot_mapping[row]: the qkv product, then
    triton_ops.rotary_and_cache, in one kernel."""
    if not fits_qkv_rope(x, weight, kv_cache, num_heads, num_kv_heads, head_dim, tile):
        raise ValueError(f"qkv_rope: x {tuple(x.shape)}, weight {tuple(weight.shape)}, cache "
                         f"{tuple(kv_cache.shape)} do not fit tile {tile} with {num_heads} + 2 x "
                         f"{num_kv_heads} heads of {head_dim}")
    m, k = x.shape
    q = torch.empty((m, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if m == 0:
        return q
    pairs = tile.block_n  # rotation pairs per program
    grid = (triton.cdiv((num_heads + 2 * num_kv_heads) * head_dim // 2, pairs),)
    _qkv_rope_kernel[grid](
        x, weight, q, cos.contiguous(), sin.contiguous(), kv_cache, slot_mapping, m, k,
        x.stride(0), weight.stride(0), num_heads * head_dim, kv_cache.stride(0), num_heads,
        num_kv_heads, BLOCK_M=block_m(m), PAIRS=pairs, HALF=head_dim // 2,
        BLOCK_K=tile.block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_stages=tile.num_stages, num_warps=tile.num_warps, **triton_pdl.kwargs(x.device))
    return q


def fits_qkv_rope(x: torch.Tensor, weight: torch.Tensor, kv_cache: torch.Tensor, num_heads: int,
                  num_kv_heads: int, head_dim: int, tile: Tile) -> bool:
    """Whether qkv_rope runs this shape as the tile asks: a power-of-two count of at least 16
    rotation pairs per program (tl.dot's least) that tiles the heads (a part of one head, or whole
    ones), K in whole steps, a cache of this layer's heads."""
    pairs, half = tile.block_n, head_dim // 2
    return (tile.split_k == 1 and head_dim % 2 == 0 and pairs >= 16 and pairs & (pairs - 1) == 0
            and (half % pairs == 0 or pairs % half == 0)
            and weight.shape[0] == (num_heads + 2 * num_kv_heads) * head_dim
            and kv_cache.dtype == x.dtype and tuple(kv_cache.shape[3:]) == (num_kv_heads, head_dim)
            and kv_cache[0].is_contiguous() and fits(x, weight, tile))


def fits_gate_up_silu(x: torch.Tensor, weight: torch.Tensor, tile: Tile) -> bool:
    """Whether gate_up_silu runs this shape as the tile asks (no split of K; an even merged weight)."""
    return tile.split_k == 1 and weight.shape[0] % 2 == 0 and fits(x, weight, tile)


# -- the measured table -----------------------------------------------------------------------

def table_key(num_rows: int, n: int, k: int, dtype: torch.dtype) -> str:
    return f"{row_class(num_rows)},{n},{k},{str(dtype).removeprefix('torch.')}"


def _tiles_of(device_name: str, config_file: Path | None = None) -> dict[str, Tile]:
    """The table's tiles for a GPU, from config_file (default: CONFIG_FILE as it is now, which a
    benchmark may point at another measured table)."""
    return _read_tiles(device_name, config_file or CONFIG_FILE)


@functools.cache
def _read_tiles(device_name: str, config_file: Path) -> dict[str, Tile]:
    if not config_file.exists():
        return {}
    table = json.loads(config_file.read_text())
    entries = table.get(device_name, {})
    if isinstance(entries, str):  # a GPU of the same chip: it runs the named GPU's tiles
        entries = table.get(entries, {})
        assert isinstance(entries, dict), f"{device_name} names a GPU that names another"
    return {key: Tile(*value) for key, value in entries.items()}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def silu_table_key(num_rows: int, n: int, k: int, dtype: torch.dtype) -> str:
    return "silu-" + table_key(num_rows, n, k, dtype)


def rope_table_key(num_rows: int, n: int, k: int, dtype: torch.dtype) -> str:
    return "rope-" + table_key(num_rows, n, k, dtype)


def tile_for(x: torch.Tensor, weight: torch.Tensor) -> Tile | None:
    """The measured tile for this product on x's GPU, or None: cuBLAS then."""
    tile = _lookup(x, weight, table_key)
    return tile if tile is not None and fits(x, weight, tile) else None


def gate_up_silu_tile_for(x: torch.Tensor, weight: torch.Tensor) -> Tile | None:
    """The measured tile of the gate/up product with SiLU x up fused, or None: the pair apart."""
    tile = _lookup(x, weight, silu_table_key)
    return tile if tile is not None and fits_gate_up_silu(x, weight, tile) else None


def qkv_rope_tile_for(x: torch.Tensor, weight: torch.Tensor, kv_cache: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int) -> Tile | None:
    """The measured tile of the qkv product with the rotary and the cache write fused, or None:
    the product and triton_ops.rotary_and_cache apart."""
    tile = _lookup(x, weight, rope_table_key)
    return tile if tile is not None and fits_qkv_rope(x, weight, kv_cache, num_heads,
                                                      num_kv_heads, head_dim, tile) else None


def _lookup(x: torch.Tensor, weight: torch.Tensor, key) -> Tile | None:
    if not x.is_cuda or x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[0] == 0:
        return None
    tiles = _tiles_of(_device_name(x.device.index or 0))
    return tiles.get(key(x.shape[0], weight.shape[0], weight.shape[1], x.dtype))

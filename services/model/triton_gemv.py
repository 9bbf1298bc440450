"""Batch-1 decode products in Triton, with the elementwise op that feeds each one fused in.

At batch 1 a decoder layer is four matrix-vector products and the small kernels between them
(the residual add and RMSNorm before qkv and gate_up, SiLU x mul before down). Each small kernel
reads a few KB, yet costs a launch and a drain of the GPU, ~2 us on an H200, against 3-30 us for
the products themselves. Here the product reads its input through the op instead:

    prologue        y = W · x'    with x' =                       and also writes
    none            x
    rms_norm        w_n ⊙ x / rms(x)
    add_rms_norm    w_n ⊙ h / rms(h),  h = x + residual           h (the residual stream)
    silu_mul        silu(gate) ⊙ up,   x = [gate | up]

    grid (cdiv(N, BLOCK_N),): one program computes y[n-tile], walking K in BLOCK_K steps and
    accumulating W[n-tile, k-tile] * x'[k-tile] in float32 [BLOCK_N, BLOCK_K], summed at the end.

The norm's 1 / rms(h) is a scalar per row, so it is taken out of the sum: y = (Σ_k W h_k w_k) / rms(h)
with Σ h_k² accumulated over the same tiles as the product, one pass over h and no prologue
before the first weight load. The normalised input is therefore not rounded to the model's dtype
before the product as the unfused path rounds it (transformers too): the difference is that
rounding, within the bf16 error. SiLU x mul rounds as the unfused kernel does (silu rounded, then
the product). Program 0 writes h. Where this runs is data, as for the skinny matmul
(triton_linear): `linear_configs.json` holds a tile under `gemv-<prologue>,N,K,dtype` only where
`bench/tune_linear.py` measured the fused kernel faster than the unfused pair (the op's kernel and
the product on cuBLAS or its measured tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.model import triton_pdl
from services.model.triton_linear import Tile, _device_name, _tiles_of
from services.model.triton_pdl import pdl_begin

PROLOGUES = {"none": 0, "rms_norm": 1, "add_rms_norm": 2, "silu_mul": 3}


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, norm_w_ptr, w_ptr, y_ptr, res_out_ptr, N, K, stride_wn, eps,
                 PROLOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    """y [N] = W [N, K] · x' [K] (x' per PROLOGUE, see the module docstring); K % BLOCK_K == 0."""
    pdl_begin(PDL)
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    squares = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + rk)
        if PROLOGUE == 3:  # [gate | up]: up sits K columns on
            g = x.to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(x.dtype)  # rounded, as the unfused kernel rounds
            up = tl.load(x_ptr + K + rk)
            xin = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype).to(tl.float32)
        else:
            if PROLOGUE == 2:
                h = (x.to(tl.float32) + tl.load(res_ptr + rk).to(tl.float32)).to(x.dtype)
                tl.store(res_out_ptr + rk, h, mask=(rk < K) & (pid == 0))
            else:
                h = x
            xin = h.to(tl.float32)
            if PROLOGUE != 0:
                squares += xin * xin
                xin = xin * tl.load(norm_w_ptr + rk).to(tl.float32)
        acc += w.to(tl.float32) * xin[None, :]
    y = tl.sum(acc, 1)  # [BLOCK_N]
    if PROLOGUE == 1 or PROLOGUE == 2:
        y = y * tl.rsqrt(tl.sum(squares, 0) / K + eps)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def fits(x: torch.Tensor, weight: torch.Tensor, prologue: str, tile: Tile) -> bool:
    """Whether the kernel runs this product as the tile asks: one contiguous row, K a multiple of
    the tile's BLOCK_K (K is the product's inner size: half of x's width for silu_mul)."""
    k = weight.shape[1]
    width = 2 * k if prologue == "silu_mul" else k
    return (x.dim() == 2 and x.shape == (1, width) and x.is_contiguous() and weight.stride(1) == 1
            and k % tile.block_k == 0 and x.dtype == weight.dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor, tile: Tile, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, out_dtype: torch.dtype | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [1, K] (silu_mul: [1, 2K] = [gate | up]), weight [N, K] -> (W x' [1, N], h or None).

    h = x + residual [1, K] comes back for add_rms_norm (the residual stream after the add)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"gemv: unknown prologue {prologue!r}, expected one of {sorted(PROLOGUES)}")
    if not fits(x, weight, prologue, tile):
        raise ValueError(f"gemv: x {tuple(x.shape)}, weight {tuple(weight.shape)} ({prologue}) do "
                         f"not fit tile {tile}")
    if prologue in ("rms_norm", "add_rms_norm") and norm_weight is None:
        raise ValueError(f"gemv: {prologue} needs the norm's weight")
    if prologue == "add_rms_norm" and (residual is None or residual.shape != x.shape):
        raise ValueError(f"gemv: add_rms_norm needs a residual of x's shape {tuple(x.shape)}")
    n, k = weight.shape
    y = torch.empty((1, n), dtype=out_dtype or x.dtype, device=x.device)
    res_out = torch.empty_like(x) if prologue == "add_rms_norm" else None
    _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
        x, residual.contiguous() if residual is not None else x,
        norm_weight if norm_weight is not None else x, weight, y,
        res_out if res_out is not None else y, n, k, weight.stride(0), eps,
        PROLOGUE=PROLOGUES[prologue], BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_stages=tile.num_stages, num_warps=tile.num_warps, **triton_pdl.kwargs(x.device))
    return y, res_out


def table_key(prologue: str, n: int, k: int, dtype: torch.dtype) -> str:
    return f"gemv-{prologue},{n},{k},{str(dtype).removeprefix('torch.')}"


def tile_for(x: torch.Tensor, weight: torch.Tensor, prologue: str) -> Tile | None:
    """The measured fused tile for this batch-1 product on x's GPU, or None: the unfused path."""
    if not x.is_cuda or x.dim() != 2 or x.shape[0] != 1:
        return None
    tiles = _tiles_of(_device_name(x.device.index or 0))
    tile = tiles.get(table_key(prologue, weight.shape[0], weight.shape[1], x.dtype))
    return tile if tile is not None and fits(x, weight, prologue, tile) else None

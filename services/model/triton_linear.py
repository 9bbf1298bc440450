"""Skinny matmuls in Triton: Y = X Wᵀ for decode batches of at most 64 rows, where a measured
table says the kernel beats cuBLAS on this GPU.

At batch 1 a decode step is a chain of matrix-vector products, and cuBLAS runs the small ones
(Llama-1B's o_proj, 8 MB) at a third of the memory bandwidth: a kernel tuned for the shape, with
enough programs in flight to fill the GPU, reads the weight closer to the bandwidth. Which
kernel wins depends on the GPU and the shape, so the choice is data: `linear_configs.json` maps
a device name and (rows class, N, K) to a tile, and holds only the shapes where the Triton tile
measured faster than cuBLAS (`bench/tune_linear.py` measures and writes it). A shape it does not
hold runs on cuBLAS; a given GPU and checkpoint therefore always run the same kernels, so a
replica that takes over a stream computes what the first one did.

    grid (cdiv(N, BLOCK_N), SPLIT_K): one program computes Y[:, n-tile] over K / SPLIT_K of K;
    BLOCK_M (16, 32 or 64) covers every row of X (tl.dot needs 16 at least; padding rows are 0).
    SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N] that a second kernel sums and rounds.

Accumulation is float32 on tensor cores (exact products for float32 inputs): the result differs
from cuBLAS's in the order of the sum only, within the dtype's rounding.

The kernel can also read X through the elementwise op that feeds the product in a decoder layer
(the prologues of triton_gemv, there at one row, here at up to 64): the residual add and RMSNorm
before qkv and gate/up, SiLU x up before down. At 64 rows those ops are ~2.6-4 us kernels of a
few hundred KB each, two to three per layer, as long as the smaller products themselves.
RMSNorm's 1 / rms is a scalar per row, so each program sums the squares of its rows over the
K tiles it walks and scales its accumulator at the end (SPLIT_K = 1), or writes its squares
[SPLIT_K, M] for the sum of the splits to apply. The product then takes X ⊙ w_norm rounded to the
dtype where the unfused path rounds X / rms first: another rounding, within the dtype's error.
Which shapes run fused is data again: `skinny-<prologue>,rows,N,K,dtype` entries, written by
`bench/tune_linear.py` where the fused kernel measured faster than the op's kernel and the product.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # past this a step is a real GEMM and cuBLAS's tiles are the right ones
ROW_CLASSES = (1, 16, 32, 64)  # a table entry serves every row count up to its class
CONFIG_FILE = Path(__file__).with_name("linear_configs.json")


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


PROLOGUES = {"none": 0, "rms_norm": 1, "add_rms_norm": 2, "silu_mul": 3}  # triton_gemv's too


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, res_ptr, norm_w_ptr, res_out_ptr, squares_ptr,
                   M, N, K, stride_xm, stride_rm, stride_wn, stride_ys, stride_ym, eps,
                   PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Y[split, :, n-tile] = X'[:, k-range] W[n-tile, k-range]ᵀ, X' = X through PROLOGUE (module
    docstring); K is a multiple of BLOCK_K · SPLIT_K. Split s walks K tiles s, s + SPLIT_K, ..."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    row_ok, col_ok = rm[:, None] < M, rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(split * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=row_ok, other=0.0)
        if PROLOGUE == 3:  # [gate | up]: up sits K columns on; rounded as the unfused kernel rounds
            up = tl.load(x_ptr + rm[:, None] * stride_xm + K + rk[None, :], mask=row_ok, other=0.0)
            g = x.to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(x.dtype)
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        elif PROLOGUE != 0:
            if PROLOGUE == 2:  # h = x + residual, the residual stream, written by the first N tile
                r = tl.load(res_ptr + rm[:, None] * stride_rm + rk[None, :], mask=row_ok, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                tl.store(res_out_ptr + rm[:, None] * K + rk[None, :], x, mask=row_ok & (pid_n == 0))
            h = x.to(tl.float32)
            squares += tl.sum(h * h, 1)
            x = (h * tl.load(norm_w_ptr + rk).to(tl.float32)[None, :]).to(x.dtype)
        w = tl.load(w_rows + rk[None, :], mask=col_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if PROLOGUE == 1 or PROLOGUE == 2:
        if SPLIT_K == 1:
            acc = acc * tl.rsqrt(squares / K + eps)[:, None]
        else:
            tl.store(squares_ptr + split * M + rm, squares, mask=(rm < M) & (pid_n == 0))
    out = y_ptr + split * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok & (rn[None, :] < N))


@triton.jit
def _sum_splits_kernel(partial_ptr, y_ptr, squares_ptr, M, N, K, eps, SPLIT_K: tl.constexpr,
                       NORM: tl.constexpr, BLOCK: tl.constexpr):
    """y [M, N] = sum over splits of partial [SPLIT_K, M, N] (float32), in y's dtype; with NORM
    each row scaled by 1 / rms from its squares [SPLIT_K, M]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(partial_ptr + s * M * N + i, mask=mask, other=0.0)
    if NORM:
        row = i // N
        total = tl.zeros((BLOCK,), tl.float32)
        for s in range(SPLIT_K):
            total += tl.load(squares_ptr + s * M + row, mask=mask, other=0.0)
        acc = acc * tl.rsqrt(total / K + eps)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)


def fits(x: torch.Tensor, weight: torch.Tensor, tile: Tile, prologue: str = "none") -> bool:
    """Whether the kernel runs this shape as the tile asks (K divides into its steps); K is the
    product's inner size, half of x's width for silu_mul ([gate | up])."""
    k = weight.shape[1]
    width = 2 * k if prologue == "silu_mul" else k
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.shape[1] == width
            and k % (tile.block_k * tile.split_k) == 0 and x.stride(1) == 1
            and weight.stride(1) == 1 and x.dtype == weight.dtype)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, tile: Tile,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K] (M <= 64) -> x weightᵀ [M, N] in out_dtype (default x's)."""
    return fused_skinny_matmul(x, weight, tile, out_dtype=out_dtype)[0]


def fused_skinny_matmul(x: torch.Tensor, weight: torch.Tensor, tile: Tile, prologue: str = "none",
                        residual: torch.Tensor | None = None,
                        norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                        out_dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] (silu_mul: [M, 2K] = [gate | up]), weight [N, K], M <= 64 -> (W x'ᵀ [M, N], h or
    None), x' per prologue (module docstring); h = x + residual [M, K] for add_rms_norm. The
    arguments are triton_gemv.gemv's, so a caller takes either kernel by the rows it has."""
    if prologue not in PROLOGUES:
        raise ValueError(f"skinny matmul: unknown prologue {prologue!r}, expected one of "
                         f"{sorted(PROLOGUES)}")
    if not fits(x, weight, tile, prologue):
        raise ValueError(f"skinny matmul: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         f"({prologue}) do not fit tile {tile}")
    if prologue in ("rms_norm", "add_rms_norm") and norm_weight is None:
        raise ValueError(f"skinny matmul: {prologue} needs the norm's weight")
    if prologue == "add_rms_norm" and (residual is None or residual.shape != x.shape
                                       or residual.stride(1) != 1):
        raise ValueError(f"skinny matmul: add_rms_norm needs a residual of x's shape "
                         f"{tuple(x.shape)}, rows contiguous")
    m = x.shape[0]
    n, k = weight.shape
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    res_out = torch.empty((m, k), dtype=x.dtype, device=x.device) \
        if prologue == "add_rms_norm" else None
    if m == 0:
        return y, res_out
    split = tile.split_k
    partial = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    norm = prologue in ("rms_norm", "add_rms_norm")
    squares = torch.empty((split, m), dtype=torch.float32, device=x.device) \
        if norm and split > 1 else partial
    _skinny_kernel[(triton.cdiv(n, tile.block_n), split)](
        x, weight, partial, residual if residual is not None else x,
        norm_weight if norm_weight is not None else x, res_out if res_out is not None else x,
        squares, m, n, k, x.stride(0), residual.stride(0) if residual is not None else 0,
        weight.stride(0), partial.stride(0) if split > 1 else 0, n, eps,
        PROLOGUE=PROLOGUES[prologue], BLOCK_M=block_m(m), BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, SPLIT_K=split,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_stages=tile.num_stages, num_warps=tile.num_warps)
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            partial, y, squares, m, n, k, eps, SPLIT_K=split, NORM=norm, BLOCK=block, num_warps=4)
    return y, res_out


# -- the measured table -----------------------------------------------------------------------

def table_key(num_rows: int, n: int, k: int, dtype: torch.dtype, prologue: str = "none") -> str:
    """`rows,N,K,dtype` for a plain product, `skinny-<prologue>,rows,N,K,dtype` for a fused one."""
    key = f"{row_class(num_rows)},{n},{k},{str(dtype).removeprefix('torch.')}"
    return key if prologue == "none" else f"skinny-{prologue},{key}"


@functools.cache
def _tiles_of(device_name: str, config_file: Path = CONFIG_FILE) -> dict[str, Tile]:
    if not config_file.exists():
        return {}
    entries = json.loads(config_file.read_text()).get(device_name, {})
    return {key: Tile(*value) for key, value in entries.items()}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tile_for(x: torch.Tensor, weight: torch.Tensor, prologue: str = "none") -> Tile | None:
    """The measured tile for this product (with prologue fused in) on x's GPU, or None: cuBLAS
    then (and the prologue's own kernel)."""
    if not x.is_cuda or x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[0] == 0:
        return None
    tiles = _tiles_of(_device_name(x.device.index or 0))
    tile = tiles.get(table_key(x.shape[0], weight.shape[0], weight.shape[1], x.dtype, prologue))
    return tile if tile is not None and fits(x, weight, tile, prologue) else None

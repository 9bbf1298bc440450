"""Fused elementwise kernels of a decoder layer, in Triton (CUDA; on CPU under TRITON_INTERPRET=1).

Each replaces a chain of small torch kernels whose launches, not their bytes, cost the time of a
small-batch decode step, and each rounds where the torch reference (layers.py) rounds, so the two
agree to the bf16 rounding of a few elements:

    fused_add_rms_norm   r = x + residual (rounded to the dtype); y = w ⊙ (r / sqrt(mean(r²) + eps))
                         with the normalisation in float32, as transformers computes it
    silu_and_mul         [gate | up] -> silu(gate) ⊙ up
    rotary_inplace       q, k of a fused qkv row rotated by RoPE: x·cos + rotate_half(x)·sin
    rotary_and_cache     the same, and the row's rotated k and its v written to its KV cache slot
                         (attention.write_kv's index copies, two per layer, fused away)
    argmax_rows          greedy ids of a batch of logit rows, the first index of the maximum as
                         torch.argmax picks it, split over the vocabulary (torch's reduction runs
                         one row on one block: 27 us for a 128k vocabulary at batch 1)

One program per token row; a row (hidden size, or heads x head_dim) fits one block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.model import triton_pdl
from services.model.triton_pdl import pdl_begin


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # rounded like a torch add
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype)  # torch: x.to(input_dtype) before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype),
             mask=mask)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [n, hidden] -> (norm(x + residual), x + residual); residual None: (norm(x), x)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    n_rows, n_cols = x.shape
    if n_rows:
        _add_rms_norm_kernel[(n_rows,)](
            x, residual.contiguous() if residual is not None else x, weight, out, res_out, n_cols,
            eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols),
            num_warps=_warps(n_cols), **triton_pdl.kwargs(x.device))
    return out, res_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch rounds silu(gate) before the product
    tl.store(out_ptr + row * n_cols + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2·m] = [gate | up] -> [n, m] silu(gate) ⊙ up."""
    gate_up = gate_up.contiguous()
    n_rows, width = gate_up.shape
    out = torch.empty((n_rows, width // 2), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if n_rows:
        _silu_and_mul_kernel[(n_rows, triton.cdiv(width // 2, block))](
            gate_up, out, width // 2, BLOCK=block, num_warps=4,
            **triton_pdl.kwargs(gate_up.device))
    return out


@triton.jit
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, row_stride, num_heads,
                   num_kv_heads, stride_kv, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                   KV_PAD: tl.constexpr, WRITE_CACHE: tl.constexpr, PDL: tl.constexpr):
    """One token row: its q and k heads rotated in place; WRITE_CACHE: then k (rotated) and v
    stored at the row's slot of the cache, whose slots are rows of num_kv_heads x head_dim
    (stride_kv: K to V)."""
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    num_rot = num_heads + num_kv_heads  # q heads then k heads lie side by side
    heads = tl.arange(0, HEADS_PAD)[:, None]  # [H, 1]
    j = tl.arange(0, HALF)[None, :]  # [1, d/2]
    mask = heads < num_rot
    base = qkv_ptr + row * row_stride + heads * (2 * HALF)
    x1 = tl.load(base + j, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
    cos1 = tl.load(cos_ptr + row * 2 * HALF + j).to(tl.float32)  # cos = [c, c]: halves are equal
    sin1 = tl.load(sin_ptr + row * 2 * HALF + j).to(tl.float32)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    r1, r2 = (x1f * cos1 - x2f * sin1).to(x1.dtype), (x2f * cos1 + x1f * sin1).to(x1.dtype)
    tl.store(base + j, r1, mask=mask)
    tl.store(base + HALF + j, r2, mask=mask)
    if WRITE_CACHE:
        slot_base = cache_ptr + tl.load(slot_ptr + row).to(tl.int64) * num_kv_heads * 2 * HALF
        is_k = mask & (heads >= num_heads)
        k_dst = slot_base + (heads - num_heads) * (2 * HALF)
        tl.store(k_dst + j, r1, mask=is_k)
        tl.store(k_dst + HALF + j, r2, mask=is_k)
        kv_heads = tl.arange(0, KV_PAD)[:, None]
        d = tl.arange(0, 2 * HALF)[None, :]
        is_v = kv_heads < num_kv_heads
        v = tl.load(qkv_ptr + row * row_stride + (num_rot + kv_heads) * (2 * HALF) + d, mask=is_v)
        tl.store(slot_base + stride_kv + kv_heads * (2 * HALF) + d, v, mask=is_v)


def rotary_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> None:
    """qkv [n, (heads + 2·kv_heads)·d] (contiguous): rotates its q and k heads in place by
    cos/sin [n, d] (each the same d/2 values twice, as RotaryEmbedding.cos_sin makes them)."""
    _launch_rotary(qkv, cos, sin, None, None, num_heads, num_kv_heads, head_dim)


def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                     num_kv_heads: int, head_dim: int) -> None:
    """rotary_inplace, and each row's rotated k and its v written to kv_cache
    [2, num_blocks, block_size, num_kv_heads, head_dim] at flat slot slot_mapping[row]."""
    if kv_cache.dtype != qkv.dtype or tuple(kv_cache.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not fit "
                         f"{num_kv_heads} KV heads of {head_dim} in {qkv.dtype}")
    if not kv_cache[0].is_contiguous():
        raise ValueError("rotary_and_cache needs K and V each contiguous in the cache")
    _launch_rotary(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim)


def _launch_rotary(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
    """One program per row; kv_cache None: rotation only (qkv stands in for the unused cache
    and slot pointers)."""
    if not qkv.shape[0]:
        return
    write_cache = kv_cache is not None
    _rotary_kernel[(qkv.shape[0],)](
        qkv, cos.contiguous(), sin.contiguous(), kv_cache if write_cache else qkv,
        slot_mapping if write_cache else qkv, qkv.stride(0), num_heads, num_kv_heads,
        kv_cache.stride(0) if write_cache else 0, HALF=head_dim // 2,
        HEADS_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
        KV_PAD=triton.next_power_of_2(num_kv_heads), WRITE_CACHE=write_cache, num_warps=4,
        **triton_pdl.kwargs(qkv.device))


_ARGMAX_CHUNK = 4096  # logits per program of the first pass


@triton.jit
def _argmax_chunk_kernel(logits_ptr, values_ptr, indices_ptr, n_cols, row_stride,
                         CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Pass 1, one (row, chunk): the chunk's maximum and the first index holding it. NaN counts
    as the largest value, as in torch.argmax."""
    pdl_begin(PDL)
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < n_cols,
                other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    best = tl.max(x, 0)
    first = tl.min(tl.where((x == best) & (cols < n_cols), cols, n_cols), 0)
    tl.store(values_ptr + row * tl.num_programs(1) + chunk, best)
    tl.store(indices_ptr + row * tl.num_programs(1) + chunk, first)


@triton.jit
def _argmax_reduce_kernel(values_ptr, indices_ptr, out_ptr, num_chunks, n_cols,
                          CHUNKS_PAD: tl.constexpr, PDL: tl.constexpr):
    """Pass 2, one row: the largest chunk maximum, the first index among chunks that hold it."""
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_PAD)
    valid = c < num_chunks
    values = tl.load(values_ptr + row * num_chunks + c, mask=valid, other=float("-inf"))
    indices = tl.load(indices_ptr + row * num_chunks + c, mask=valid, other=n_cols)
    best = tl.max(values, 0)
    first = tl.min(tl.where((values == best) & valid, indices, n_cols), 0)
    tl.store(out_ptr + row, tl.minimum(first, n_cols - 1).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> [n] int64, each row's torch.argmax (first index of the maximum)."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(n_cols, _ARGMAX_CHUNK)
    values = torch.empty((n_rows, num_chunks), dtype=torch.float32, device=logits.device)
    indices = torch.empty((n_rows, num_chunks), dtype=torch.int32, device=logits.device)
    out = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    if n_rows:
        _argmax_chunk_kernel[(n_rows, num_chunks)](logits, values, indices, n_cols,
                                                   logits.stride(0), CHUNK=_ARGMAX_CHUNK,
                                                   num_warps=8, **triton_pdl.kwargs(logits.device))
        argmax_of_chunks(values, indices, out, n_cols)
    return out


def argmax_of_chunks(values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                     n_cols: int) -> None:
    """Pass 2 alone: out [n] = per row the first index among its chunks' (maximum [n, chunks]
    float32, first index [n, chunks] int32) that hold the largest maximum."""
    n_rows, num_chunks = values.shape
    _argmax_reduce_kernel[(n_rows,)](values, indices, out, num_chunks, n_cols,
                                     CHUNKS_PAD=triton.next_power_of_2(num_chunks),
                                     num_warps=1 if num_chunks <= 256 else 4,
                                     **triton_pdl.kwargs(values.device))


def _warps(n_cols: int) -> int:
    return 4 if n_cols <= 2048 else 8

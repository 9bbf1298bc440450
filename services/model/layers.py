"""Tensor-parallel layers that each read only their own slice of a checkpoint tensor.

Weights keep torch's nn.Linear layout, [out_features, in_features], so Y = X Aᵀ; the docstrings
speak of A as the math's [in, out] matrix (Megatron convention): "split by columns" of A means
split by rows of the stored weight.

`source` below is a safetensors slice (`safe_open(...).get_slice(name)`), or anything else that
supports `source[a:b]` and `source[:, a:b]`; only the indexed rows/columns are read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.model.attention import write_kv
from services.model.comm import tp_all_gather, tp_all_reduce
from services.model.parallel import ParallelContext, divide, kv_head_start, kv_heads_per_rank

SliceSource = Any  # safetensors PySafeSlice or a torch.Tensor


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _copy_into(dst: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint slice has shape {tuple(loaded.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """Y = X A + b, A split by columns: A = [A_1 … A_p], b = [b_1 … b_p].

    Rank i holds A_i ([output_size / p, input_size] stored) and returns Y_i = X A_i + b_i,
    [num_tokens, output_size / p]; no communication in forward.
    """

    def __init__(self, input_size: int, output_size: int, ctx: ParallelContext, bias: bool = False):
        super().__init__()
        self.ctx = ctx
        self.input_size = input_size
        self.output_size_per_rank = divide(output_size, ctx.tp_size, "output_size")
        self.weight = _param(self.output_size_per_rank, input_size)
        self.bias = _param(self.output_size_per_rank) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)  # [n, in] -> [n, out / p]

    def load_slice(self, param_name: str, source: SliceSource, shard_id: Any = None) -> None:
        start = self.ctx.tp_rank * self.output_size_per_rank
        loaded = source[start : start + self.output_size_per_rank]
        _copy_into(getattr(self, param_name), loaded, param_name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """[Y_gate | Y_up] = X [A_gate | A_up], each of the merged matrices split by columns.

    Rank i holds [A_gate,i | A_up,i] in one weight ([sum(output_sizes) / p, input_size]);
    shard_id k loads the k-th checkpoint tensor into rows [sum(sizes[:k]) / p, … + sizes[k] / p).
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], ctx: ParallelContext, bias: bool = False):
        super().__init__(input_size, sum(output_sizes), ctx, bias)
        self.output_sizes_per_rank = [divide(size, ctx.tp_size, "output_size") for size in output_sizes]

    def load_slice(self, param_name: str, source: SliceSource, shard_id: Any = None) -> None:
        size = self.output_sizes_per_rank[shard_id]
        offset = sum(self.output_sizes_per_rank[:shard_id])
        start = self.ctx.tp_rank * size
        dst = getattr(self, param_name)[offset : offset + size]
        _copy_into(dst, source[start : start + size], f"{param_name}[{shard_id}]")


class QKVParallelLinear(ColumnParallelLinear):
    """[Q | K | V] = X [A_q | A_k | A_v], split by heads.

    Rank i holds q heads [i·H/p, (i+1)·H/p) and the KV heads those q heads read: KV heads are split
    when p <= num_kv_heads and replicated when p > num_kv_heads (see parallel.kv_head_start).
    Output per rank: [num_tokens, (num_heads_per_rank + 2 · num_kv_heads_per_rank) · head_dim].
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        ctx: ParallelContext,
        bias: bool = False,
    ):
        num_heads_per_rank = divide(total_num_heads, ctx.tp_size, "num_attention_heads")
        num_kv_heads_per_rank = kv_heads_per_rank(total_num_kv_heads, ctx.tp_size)
        output_size_per_rank = (num_heads_per_rank + 2 * num_kv_heads_per_rank) * head_dim
        super().__init__(hidden_size, output_size_per_rank * ctx.tp_size, ctx, bias)
        self.head_dim = head_dim
        self.num_heads_per_rank = num_heads_per_rank
        self.num_kv_heads_per_rank = num_kv_heads_per_rank
        self.kv_head_start = kv_head_start(total_num_kv_heads, ctx.tp_size, ctx.tp_rank)

    def load_slice(self, param_name: str, source: SliceSource, shard_id: Any = None) -> None:
        q_rows = self.num_heads_per_rank * self.head_dim
        kv_rows = self.num_kv_heads_per_rank * self.head_dim
        if shard_id == "q":
            offset, start, size = 0, self.ctx.tp_rank * q_rows, q_rows
        else:
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            start, size = self.kv_head_start * self.head_dim, kv_rows
        dst = getattr(self, param_name)[offset : offset + size]
        _copy_into(dst, source[start : start + size], f"{param_name}[{shard_id}]")


class RowParallelLinear(nn.Module):
    """Y = X A + b, A split by rows: A = [A_1; …; A_p], X = [X_1 … X_p] split by columns.

    Rank i holds A_i ([output_size, input_size / p] stored), computes X_i A_i, and the all-reduce
    sums them: Y = Σ_i X_i A_i. The bias is replicated and added once, after the sum.
    """

    def __init__(self, input_size: int, output_size: int, ctx: ParallelContext, bias: bool = False):
        super().__init__()
        self.ctx = ctx
        self.input_size_per_rank = divide(input_size, ctx.tp_size, "input_size")
        self.weight = _param(output_size, self.input_size_per_rank)
        self.bias = _param(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(linear(x, self.weight))  # [n, in / p] -> [n, out]

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's X_i A_i [n, out] -> Σ_i X_i A_i (+ b)."""
        y = tp_all_reduce(partial, self.ctx)
        return y if self.bias is None else y + self.bias

    def load_slice(self, param_name: str, source: SliceSource, shard_id: Any = None) -> None:
        if param_name == "bias":
            _copy_into(self.bias, source[:], "bias")
            return
        start = self.ctx.tp_rank * self.input_size_per_rank
        _copy_into(self.weight, source[:, start : start + self.input_size_per_rank], "weight")


class VocabParallelEmbedding(nn.Module):
    """E [vocab, hidden] split by rows: rank i holds token ids [i·V_r, (i+1)·V_r), V_r = ceil(V/p).

    Each rank looks up the ids it owns, writes zeros for the others, and the all-reduce sums the
    ranks' rows into the full embedding. Rows past the vocab (padding of the last rank) are zero.
    """

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.vocab_size_per_rank = math.ceil(vocab_size / ctx.tp_size)
        self.vocab_start = ctx.tp_rank * self.vocab_size_per_rank
        self.vocab_end = min(self.vocab_start + self.vocab_size_per_rank, vocab_size)
        self.weight = _param(self.vocab_size_per_rank, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [n] -> [n, hidden]
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [n]
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        x = F.embedding(local_ids, self.weight).masked_fill_(~owned.unsqueeze(-1), 0.0)  # [n, hidden]
        return tp_all_reduce(x, self.ctx)

    def load_slice(self, param_name: str, source: SliceSource, shard_id: Any = None) -> None:
        num_rows = self.vocab_end - self.vocab_start
        _copy_into(self.weight[:num_rows], source[self.vocab_start : self.vocab_end], param_name)
        self.weight[num_rows:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """logits = H Eᵀ with E [vocab, hidden] split by rows (vocab): rank i computes the logits of
    its ids, [n, V_r], and the all-gather concatenates them into the full [n, V] on every rank.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:  # float32 straight out of the product
            return linear(hidden, self.weight, out_dtype=torch.float32)[:, : self.vocab_size]
        logits = linear(hidden, self.weight)  # [n, hidden] -> [n, V_r]
        logits = tp_all_gather(logits, self.ctx, dim=-1)  # [n, V_r · p], in the model's dtype
        return logits[:, : self.vocab_size].float()  # [n, V]

    def logits_and_greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(hidden), its argmax [n] int64). At TP 1 on a GPU where the measured table runs
        the LM head on the skinny kernel, the argmax is in the product's epilogue."""
        tile = _lm_head_argmax_tile(hidden, self)
        if tile is None:
            from services.model.sampler import argmax_ids

            logits = self(hidden)
            return logits, argmax_ids(logits)
        from services.model import triton_linear

        logits, ids = triton_linear.skinny_matmul_argmax(hidden, self.weight, tile, self.vocab_size)
        return logits[:, : self.vocab_size], ids


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in float32 like transformers. Replicated.

    With a residual it first adds it, r = x + residual, and returns (norm(r), r): the residual
    stream travels beside the layer outputs (one fused kernel on GPUs, triton_ops).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [n, hidden] -> (norm(x + residual), x + residual); residual None: (norm(x), x)."""
        if uses_triton(x):
            from services.model.triton_ops import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(input_dtype)

    def load_slice(self, param_name: str, source: SliceSource, shard_id: Any = None) -> None:
        _copy_into(self.weight, source[:], param_name)


FUSED_KERNELS = True  # False: the plain-torch reference on GPUs too (benchmarks compare both)
SKINNY_MATMULS = True  # False: every product on cuBLAS (benchmarks compare both)
FUSED_GEMVS = True  # False: batch-1 products unfused, the norm and SiLU x mul kernels apart
FUSED_GATE_UP_SILU = True  # False: at 2-64 rows gate/up and the SiLU x mul kernel apart
FUSED_QKV_ROPE = True  # False: at 2-64 rows the qkv product and the rotary + cache kernel apart
FUSED_LM_HEAD_ARGMAX = True  # False: the greedy ids by a kernel of their own, after the LM head


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x weightᵀ (+ bias) [n, out] in out_dtype (default x's). A decode-sized x on a GPU runs a
    Triton kernel where this GPU's measured table says it beats cuBLAS: the batch-1 product
    (triton_gemv) or the skinny matmul (triton_linear)."""
    gemv_tile = _gemv_tile(x, weight, "none")
    if gemv_tile is not None:
        from services.model import triton_gemv

        y, _ = triton_gemv.gemv(x, weight, gemv_tile, out_dtype=out_dtype)
        return y if bias is None else y + bias
    if SKINNY_MATMULS and uses_triton(x) and x.dim() == 2:
        from services.model import triton_linear

        tile = triton_linear.tile_for(x, weight)
        if tile is not None:
            y = triton_linear.skinny_matmul(x, weight, tile, out_dtype)
            return y if bias is None else y + bias
    y = F.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                proj: ColumnParallelLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(x + residual)), x + residual); residual None: (proj(norm(x)), x). At batch 1 on
    a GPU whose measured table holds a fused tile for the product, one kernel (triton_gemv)."""
    prologue = "rms_norm" if residual is None else "add_rms_norm"
    tile = _gemv_tile(x, proj.weight, prologue)
    if tile is None:
        x, residual = norm(x, residual)
        return proj(x), residual
    from services.model import triton_gemv

    y, stream = triton_gemv.gemv(x, proj.weight, tile, prologue, residual, norm.weight, norm.eps)
    return (y if proj.bias is None else y + proj.bias), (x if stream is None else stream)


def silu_mul_linear(gate_up: torch.Tensor, proj: RowParallelLinear) -> torch.Tensor:
    """proj(silu(gate) ⊙ up) for gate_up [n, 2·m] = [gate | up]; fused at batch 1 as norm_linear."""
    tile = _gemv_tile(gate_up, proj.weight, "silu_mul")
    if tile is None:
        return proj(silu_and_mul(gate_up))
    from services.model import triton_gemv

    partial, _ = triton_gemv.gemv(gate_up, proj.weight, tile, "silu_mul")
    return proj.reduce(partial)


def norm_qkv_rotated(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                     qkv_proj: QKVParallelLinear, cos: torch.Tensor, sin: torch.Tensor,
                     kv_cache: torch.Tensor, slot_mapping: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [n, heads, d] of qkv_proj(norm(x + residual)) rotated, x + residual); this step's k
    (rotated) and v written to kv_cache at slot_mapping. On a GPU at 2-64 rows, where the
    measured table says so, the product with the rotary and the cache write in its epilogue
    (triton_linear.qkv_rope); else norm_linear, then rotate_and_cache."""
    heads, kv_heads, d = qkv_proj.num_heads_per_rank, qkv_proj.num_kv_heads_per_rank, qkv_proj.head_dim
    tile = _qkv_rope_tile(x, qkv_proj, kv_cache)
    if tile is not None:
        from services.model import triton_linear

        h, residual = norm(x, residual)
        return triton_linear.qkv_rope(h, qkv_proj.weight, cos, sin, kv_cache, slot_mapping,
                                      heads, kv_heads, d, tile), residual
    qkv, residual = norm_linear(x, residual, norm, qkv_proj)
    q, _, _ = rotate_and_cache(qkv, cos, sin, kv_cache, slot_mapping, heads, kv_heads, d)
    return q, residual


def gated_mlp(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
              gate_up: MergedColumnParallelLinear, down: RowParallelLinear
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down(silu(gate) ⊙ up) of norm(x + residual), x + residual). On a GPU, where the measured
    table says so: at batch 1 the GEMVs (the norm into gate/up, SiLU x up into down); at 2-64 rows
    gate/up with SiLU x up in its epilogue (triton_linear.gate_up_silu); else the kernels apart."""
    tile = _gate_up_silu_tile(x, gate_up)
    if tile is not None:
        from services.model import triton_linear

        h, residual = norm(x, residual)
        return down(triton_linear.gate_up_silu(h, gate_up.weight, tile)), residual
    gate_up_out, residual = norm_linear(x, residual, norm, gate_up)
    return silu_mul_linear(gate_up_out, down), residual


def _gate_up_silu_tile(x: torch.Tensor, proj: MergedColumnParallelLinear):
    """The measured tile of gate/up with SiLU x up fused for a decode batch of 2-64 rows, or None."""
    if not (SKINNY_MATMULS and FUSED_GATE_UP_SILU and x.dim() == 2 and x.shape[0] > 1
            and proj.bias is None and uses_triton(x)):
        return None
    from services.model import triton_linear

    return triton_linear.gate_up_silu_tile_for(x, proj.weight)


def _qkv_rope_tile(x: torch.Tensor, proj: QKVParallelLinear, kv_cache: torch.Tensor):
    """The measured tile of qkv with the rotary and cache write fused at 2-64 rows, or None."""
    if not (SKINNY_MATMULS and FUSED_QKV_ROPE and x.dim() == 2 and x.shape[0] > 1
            and proj.bias is None and uses_triton(x)):
        return None
    from services.model import triton_linear

    return triton_linear.qkv_rope_tile_for(x, proj.weight, kv_cache, proj.num_heads_per_rank,
                                           proj.num_kv_heads_per_rank, proj.head_dim)


def _lm_head_argmax_tile(x: torch.Tensor, head: ParallelLMHead):
    """The LM head's skinny tile, where its epilogue can take the argmax too, or None."""
    if not (SKINNY_MATMULS and FUSED_LM_HEAD_ARGMAX and head.ctx.tp_size == 1 and x.dim() == 2
            and uses_triton(x) and _gemv_tile(x, head.weight, "none") is None):
        return None
    from services.model import triton_linear

    tile = triton_linear.tile_for(x, head.weight)  # None unless the tile fits x
    return tile if tile is not None and tile.split_k == 1 else None


def _gemv_tile(x: torch.Tensor, weight: torch.Tensor, prologue: str):
    """The fused batch-1 tile measured for this product and prologue, or None (a CPU, a batch > 1,
    a shape the table does not hold)."""
    if not (FUSED_GEMVS and x.dim() == 2 and x.shape[0] == 1 and uses_triton(x)):
        return None
    from services.model import triton_gemv

    return triton_gemv.tile_for(x, weight, prologue)


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels (triton_ops) run on x: on GPUs where triton is installed.
    On CPUs the plain-torch code is the reference."""
    return FUSED_KERNELS and x.is_cuda and _triton_available()


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2·m] = [gate | up] -> [n, m] silu(gate) ⊙ up."""
    if uses_triton(gate_up):
        from services.model import triton_ops

        return triton_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class RotaryEmbedding(nn.Module):
    """RoPE: rotates each (x_j, x_{j+d/2}) pair of q and k by angle position · inv_freq_j.

    inv_freq_j = 1 / theta^(2j/d), then rescaled as transformers does for "linear" (÷ factor) and
    "llama3" (low frequencies ÷ factor, high kept, the band between interpolated). It is kept on
    the CPU outside the module's state so that meta-device construction leaves it intact.
    """

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None):
        super().__init__()
        self.inv_freq_cpu = compute_inv_freq(head_dim, rope_theta, rope_scaling)  # [d / 2]
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq_on(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]  # [n, d / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self.inv_freq_cpu.to(device)
        return self._inv_freq_by_device[device]


def split_qkv_rotated(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                      num_kv_heads: int, head_dim: int):
    """qkv [n, (heads + 2 kv_heads) · d] -> q [n, heads, d], k, v [n, kv_heads, d], with RoPE
    applied to q and k (on GPUs in place, one kernel: q and k then are views into qkv)."""
    if uses_triton(qkv):
        from services.model.triton_ops import rotary_inplace

        rotary_inplace(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
    qk = qk.view(-1, num_heads + num_kv_heads, head_dim)
    if not uses_triton(qkv):  # q and k heads in one rotation: half the ops of one each
        qk = apply_rotary(qk, cos, sin)
    return qk[:, :num_heads], qk[:, num_heads:], v.view(-1, num_kv_heads, head_dim)


def rotate_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                     num_kv_heads: int, head_dim: int):
    """split_qkv_rotated, then this step's k and v written into kv_cache at slot_mapping (on
    GPUs one kernel for both). Returns q [n, heads, d], k, v [n, kv_heads, d]."""
    if uses_triton(qkv):
        from services.model.triton_ops import rotary_and_cache

        rotary_and_cache(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
                v.view(-1, num_kv_heads, head_dim))
    q, k, v = split_qkv_rotated(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    write_kv(kv_cache, k, v, slot_mapping)
    return q, k, v


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, d], cos/sin [n, d]: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [d / 2]
    rope_type = scaling["rope_type"] if scaling else None
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: wavelengths above original_max/low_freq_factor are stretched by `factor`,
    those below original_max/high_freq_factor kept, and the band between interpolated."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)

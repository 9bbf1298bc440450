"""Llama-family decoder (Llama, Mistral, Qwen2) for one TP rank of one pipeline stage.

Residual stream h, one tensor [num_tokens, hidden] that also crosses stage boundaries:

    stage 0:     h = embed(input_ids)
    each layer:  h = h + attn(norm_1(h));  h = h + mlp(norm_2(h))
    last stage:  returns norm(h); compute_logits(norm(h)) = norm(h) Eᵀ, full vocab on every TP rank

Parameter names follow the checkpoint (`model.layers.{i}.…`, global layer index i), except that
q/k/v are merged into `qkv_proj` and gate/up into `gate_up_proj`; `weight_sources` says which
checkpoint tensors fill which parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from services.model.attention import AttentionMetadata, attend, attend_rotating, rotates_in_decode
from services.model.config import ModelConfig
from services.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    gated_mlp,
    norm_linear,
    norm_qkv_rotated,
)
from services.model.parallel import ParallelContext

# (checkpoint tensor name, layer that loads it, its parameter "weight" | "bias", shard id)
WeightSource = tuple[str, nn.Module, str, Any]
CosSin = tuple[torch.Tensor, torch.Tensor]  # [num_tokens, head_dim] each


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            ctx,
            bias=config.attention_bias,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, ctx, bias=config.attention_out_bias
        )
        self.head_dim = config.head_dim
        self.num_heads = self.qkv_proj.num_heads_per_rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_rank

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, cos_sin: CosSin,
        kv_cache: torch.Tensor, meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream h = x + residual -> (o_proj(attention(norm(h))) [n, hidden] all-reduced,
        h); the norm runs here because on a GPU it fuses into qkv at batch 1, and the rotary
        with the cache write into the decode attention kernel (attend_rotating), or where the
        measured table says so into qkv's epilogue at 2-64 rows (layers.norm_qkv_rotated)."""
        if rotates_in_decode(meta):
            qkv, residual = norm_linear(x, residual, norm, self.qkv_proj)
            out = attend_rotating(qkv, *cos_sin, kv_cache, meta, self.num_heads,
                                  self.num_kv_heads, self.head_dim)
        else:
            # q [n, heads, d] rotated; this step's k (rotated) and v written into the cache
            q, residual = norm_qkv_rotated(x, residual, norm, self.qkv_proj, *cos_sin, kv_cache,
                                           meta.slot_mapping)
            out = attend(q, kv_cache, meta)  # [n, heads, d]
        return self.o_proj(out.flatten(1)), residual  # [n, hidden], all-reduced

    def weight_sources(self, prefix: str) -> Iterator[WeightSource]:
        params = ["weight", "bias"] if self.qkv_proj.bias is not None else ["weight"]
        for param in params:
            for shard in ("q", "k", "v"):
                yield f"{prefix}.{shard}_proj.{param}", self.qkv_proj, param, shard
        yield f"{prefix}.o_proj.weight", self.o_proj, "weight", None
        if self.o_proj.bias is not None:
            yield f"{prefix}.o_proj.bias", self.o_proj, "bias", None


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) ⊙ up(x)); gate/up column-split, down row-split: one all-reduce."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        sizes = [config.intermediate_size] * 2
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, sizes, ctx, bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, ctx, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream h = x + residual -> (mlp(norm(h)) [n, hidden] all-reduced, h); the norm runs
        here because on a GPU it fuses into gate/up (layers.gated_mlp)."""
        return gated_mlp(x, residual, norm, self.gate_up_proj, self.down_proj)

    def weight_sources(self, prefix: str) -> Iterator[WeightSource]:
        params = ["weight", "bias"] if self.down_proj.bias is not None else ["weight"]
        for param in params:
            yield f"{prefix}.gate_proj.{param}", self.gate_up_proj, param, 0
            yield f"{prefix}.up_proj.{param}", self.gate_up_proj, param, 1
            yield f"{prefix}.down_proj.{param}", self.down_proj, param, None


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, ctx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, ctx)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: CosSin, kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream h = x + residual (residual None: h = x) -> (out, residual'), the stream
        after the layer being out + residual'. The adds are fused into the norms, and at batch 1
        on a GPU the norms into the products after them (layers.norm_linear)."""
        x, residual = self.self_attn(x, residual, self.input_layernorm, cos_sin, kv_cache, meta)
        return self.mlp(x, residual, self.post_attention_layernorm)  # residual = h + attn

    def weight_sources(self, prefix: str) -> Iterator[WeightSource]:
        yield f"{prefix}.input_layernorm.weight", self.input_layernorm, "weight", None
        yield f"{prefix}.post_attention_layernorm.weight", self.post_attention_layernorm, "weight", None
        yield from self.self_attn.weight_sources(f"{prefix}.self_attn")
        yield from self.mlp.weight_sources(f"{prefix}.mlp")


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, layer_range: range):
        super().__init__()
        self.embed_tokens = None
        if ctx.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(config, ctx) for i in layer_range})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if ctx.is_last_stage else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        cos_sin = self.rotary.cos_sin(positions, h.dtype)  # [n, d] each, shared by all layers
        residual = None
        for layer, kv_cache in zip(self.layers.values(), kv_caches, strict=True):
            h, residual = layer(h, residual, cos_sin, kv_cache, meta)
        if self.norm is not None:
            return self.norm(h, residual)[0]
        return h + residual  # the residual stream, for the next stage


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, layer_range: range):
        super().__init__()
        self.config, self.ctx, self.layer_range = config, ctx, layer_range
        self.model = LlamaModel(config, ctx, layer_range)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx) if ctx.is_last_stage else None
        self.lm_head_shares_embedding = bool(
            config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None
        )
        if self.lm_head_shares_embedding:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, as in the checkpoint

    def forward(
        self,
        positions: torch.Tensor,
        attn_meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """positions [n] long; input_ids [n] on the first stage, else hidden_states [n, hidden].

        Returns [n, hidden]: the residual stream on non-last stages, its final norm on the last.
        kv_caches holds one cache per layer of this stage, in layer order.
        """
        if self.ctx.is_first_stage:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            hidden_states = self.model.embed_tokens(input_ids)  # [n, hidden], all-reduced
        elif hidden_states is None:
            raise ValueError(f"pipeline stage {self.ctx.pp_rank} needs hidden_states from the stage before")
        return self.model(hidden_states, positions, attn_meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] (final-normed) -> [n, vocab_size] float32, the full vocab on every TP rank."""
        if self.lm_head is None:
            raise ValueError(f"pipeline stage {self.ctx.pp_rank} is not the last; only it computes logits")
        return self.lm_head(hidden)  # all-gathered over TP

    def compute_logits_and_greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(compute_logits(hidden), their argmax [n] int64 on the device), in one pass where
        the GPU's kernels allow (layers.ParallelLMHead.logits_and_greedy)."""
        if self.lm_head is None:
            raise ValueError(f"pipeline stage {self.ctx.pp_rank} is not the last; only it computes logits")
        return self.lm_head.logits_and_greedy(hidden)

    def weight_sources(self) -> Iterator[WeightSource]:
        """Every checkpoint tensor this rank needs, with the layer that slices it."""
        if self.model.embed_tokens is not None:
            yield "model.embed_tokens.weight", self.model.embed_tokens, "weight", None
        for i, layer in self.model.layers.items():
            yield from layer.weight_sources(f"model.layers.{i}")
        if self.model.norm is not None:
            yield "model.norm.weight", self.model.norm, "weight", None
        if self.lm_head is not None and not self.lm_head_shares_embedding:
            name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
            yield name, self.lm_head, "weight", None

"""The model's shape, read once from a Hugging Face `config.json`.

Both spellings of RoPE settings that checkpoints use in the wild are accepted:
  - transformers < 5: top-level `rope_theta` and `rope_scaling` ({"type" | "rope_type": ...})
  - transformers >= 5: `rope_parameters` ({"rope_type", "rope_theta", ...})
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = (None, "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # always holds "rope_type" when set
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q, k, v
    attention_out_bias: bool  # bias on o_proj (Llama with attention_bias; never Qwen2)
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    # Attention here always sees the whole context; a model trained with a sliding window (Mistral,
    # some Qwen2) matches it only up to this many positions: see max_context_len.
    sliding_window: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        with open(Path(path) / "config.json", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported; "
                f"use a checkpoint of type {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={raw['hidden_act']!r}: only 'silu' is supported")
        num_heads = raw["num_attention_heads"]
        rope_theta, rope_scaling = _parse_rope(raw)
        qkv_bias, out_bias = _attention_biases(model_type, raw)
        config = cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            sliding_window=_sliding_window(model_type, raw),
        )
        config.validate()
        return config

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_scaling['rope_type']!r} is not supported; "
                "use a checkpoint with no RoPE scaling, 'llama3' or 'linear'"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_context_len(self) -> int:
        """Longest context served exactly: the position limit, or the sliding window if smaller."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _sliding_window(model_type: str, raw: dict[str, Any]) -> int | None:
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    return raw.get("sliding_window") if model_type in ("mistral", "qwen2") else None


def _attention_biases(model_type: str, raw: dict[str, Any]) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj): Qwen2 always has the first and never the second."""
    if model_type == "qwen2":
        return True, False
    bias = bool(raw.get("attention_bias", False))
    return bias, bias


def _parse_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Returns (rope_theta, scaling dict or None); "default" RoPE means no scaling."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    scaling = {"rope_type": rope_type, **params}
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 2048))
    return theta, scaling

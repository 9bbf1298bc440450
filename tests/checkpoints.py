"""Checkpoints the tests write: the GQA config saved by transformers itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# The GQA checkpoint: written by transformers itself, with Llama 3.1 RoPE scaling, untied head,
# and fewer KV heads (2) than the TP sizes tested (4).
GQA_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    initializer_range=0.15,  # larger than the default 0.02, so greedy logits are not near ties
    bos_token_id=1,
    eos_token_id=2,
)


def save_hf_llama(path: Path, tokenizer_from: Path, max_shard_size: str | None = None, **config_kwargs) -> Path:
    """A random Llama written by transformers' own save_pretrained, plus the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config_kwargs))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, path / name)
    return path

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.model.config import ModelConfig
from services.model.default_model import CONFIG

BASE = {k: v for k, v in CONFIG.items() if k not in ("rope_theta", "eos_token_id", "head_dim")}


def test_reads_the_default_model(tiny_dir: Path) -> None:
    config = ModelConfig.from_dir(tiny_dir)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 512, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 16)
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert (config.attention_bias, config.attention_out_bias, config.mlp_bias) == (False, False, False)
    assert config.torch_dtype == "float32"


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    assert ModelConfig.from_dict(BASE).head_dim == 128 // 8


def test_legacy_rope_scaling_spelling() -> None:
    raw = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_transformers_5_rope_parameters_spelling(gqa_dir: Path) -> None:
    assert "rope_parameters" in json.loads((gqa_dir / "config.json").read_text())
    config = ModelConfig.from_dir(gqa_dir)
    assert config.rope_theta == 10000.0
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert not config.tie_word_embeddings and config.num_key_value_heads == 2


def test_default_rope_type_means_no_scaling() -> None:
    raw = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    config = ModelConfig.from_dict(raw)
    assert (config.rope_theta, config.rope_scaling) == (1e6, None)


def test_eos_list_and_qwen2_biases() -> None:
    config = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "eos_token_id": [7, 2]})
    assert config.eos_token_ids == (7, 2)
    assert (config.attention_bias, config.attention_out_bias) == (True, False)
    llama = ModelConfig.from_dict({**BASE, "attention_bias": True})
    assert (llama.attention_bias, llama.attention_out_bias) == (True, True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads=3"),
        ({"hidden_act": "gelu"}, "only 'silu'"),
    ],
)
def test_unsupported_configs_say_what_to_change(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**BASE, **change})


def test_sliding_window_caps_the_context() -> None:
    mistral = ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": 256})
    assert (mistral.sliding_window, mistral.max_context_len) == (256, 256)
    qwen2 = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "sliding_window": 256})
    assert (qwen2.sliding_window, qwen2.max_context_len) == (None, 1024)  # use_sliding_window is off
    assert ModelConfig.from_dict(BASE).max_context_len == 1024

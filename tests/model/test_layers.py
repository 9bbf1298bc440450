"""Layer slicing and RoPE frequencies, one rank at a time (no process group needed to load)."""

from __future__ import annotations

import pytest
import torch

from services.model.layers import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    compute_inv_freq,
)
from services.model.parallel import ParallelContext


def rank_ctx(rank: int, size: int) -> ParallelContext:
    return ParallelContext(tp_rank=rank, tp_size=size, tp_group=object())  # loading needs no group


def test_vocab_split_pads_the_last_rank_with_zeros() -> None:
    table = torch.arange(10.0)[:, None].repeat(1, 2)  # row i = [i, i]
    shards = []
    for rank in range(4):
        layer = VocabParallelEmbedding(10, 2, rank_ctx(rank, 4))
        layer.load_slice("weight", table)
        shards.append(layer.weight[:, 0].tolist())
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 0]]
    assert ParallelLMHead(10, 2, rank_ctx(3, 4)).vocab_end == 10


def test_qkv_slices_heads_and_replicates_kv() -> None:
    head_dim = 2
    q = torch.arange(8 * head_dim)[:, None].float()  # 8 q heads, row value = row index
    k = 100 + torch.arange(2 * head_dim)[:, None].float()  # 2 kv heads
    v = 200 + torch.arange(2 * head_dim)[:, None].float()
    rows = []
    for rank in range(4):
        layer = QKVParallelLinear(1, head_dim, 8, 2, rank_ctx(rank, 4))
        for shard, source in zip("qkv", (q, k, v)):
            layer.load_slice("weight", source, shard)
        rows.append(layer.weight[:, 0].int().tolist())
    assert rows == [
        [0, 1, 2, 3, 100, 101, 200, 201],
        [4, 5, 6, 7, 100, 101, 200, 201],
        [8, 9, 10, 11, 102, 103, 202, 203],
        [12, 13, 14, 15, 102, 103, 202, 203],
    ]


def test_row_parallel_takes_columns_and_full_bias() -> None:
    weight = torch.arange(12.0).reshape(2, 6)
    layer = RowParallelLinear(6, 2, rank_ctx(1, 3), bias=True)
    layer.load_slice("weight", weight)
    layer.load_slice("bias", torch.tensor([5.0, 6.0]))
    assert layer.weight.tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert layer.bias.tolist() == [5.0, 6.0]


def test_shape_mismatch_is_reported() -> None:
    layer = RowParallelLinear(6, 2, ParallelContext())
    with pytest.raises(ValueError, match=r"weight: checkpoint slice has shape \(3, 6\), expected \(2, 6\)"):
        layer.load_slice("weight", torch.zeros(3, 6))


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ],
)  # fmt: skip
def test_inv_freq_equals_transformers(rope_parameters: dict) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=32, rope_parameters=dict(rope_parameters))
    expected = LlamaRotaryEmbedding(hf_config).inv_freq
    params = dict(rope_parameters)
    theta, rope_type = params.pop("rope_theta"), params["rope_type"]
    scaling = None if rope_type == "default" else params
    assert torch.equal(compute_inv_freq(32, theta, scaling), expected)

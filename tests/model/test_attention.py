"""Paged attention against plain dense causal attention, and the metadata it reads."""

from __future__ import annotations

import torch

from services.model.attention import (
    _decode_attention,
    allocate_kv_caches,
    build_attention_metadata,
    kv_bytes_per_block,
    paged_attention,
    write_kv,
)
from services.model.config import ModelConfig
from services.model.default_model import CONFIG
from services.model.parallel import ParallelContext

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 8, 4


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q/k/v [seq_len, heads or kv_heads, d] of one whole sequence -> [seq_len, heads, d]."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def random_seqs(lengths: list[int]) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [
        tuple(torch.randn(n, h, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)) for n in lengths
    ]


def run_steps(seqs, schedule: list[list[int]], tables: list[list[int]]) -> list[list[torch.Tensor]]:
    """schedule[step][i] = new tokens of sequence i in that step (0 = absent); outputs per seq."""
    cache = torch.zeros(2, 32, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    done = [0] * len(seqs)
    outputs: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in schedule:
        active = [i for i, n in enumerate(step) if n]
        _, meta = build_attention_metadata(
            [step[i] for i in active], [done[i] + step[i] for i in active], [tables[i] for i in active], BLOCK_SIZE
        )
        q, k, v = (torch.cat([seqs[i][j][done[i] : done[i] + step[i]] for i in active]) for j in range(3))
        out = paged_attention(q, k, v, cache, meta)
        for i, chunk in zip(active, out.split([step[i] for i in active])):
            outputs[i].append(chunk)
            done[i] += step[i]
    return outputs


def test_metadata_exact_values() -> None:
    positions, meta = build_attention_metadata([3, 1], [3, 18], [[7], [2, 9, 5, 4, 6]], 16)
    assert positions.tolist() == [0, 1, 2, 17]
    assert meta.slot_mapping.tolist() == [7 * 16, 7 * 16 + 1, 7 * 16 + 2, 9 * 16 + 1]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.block_tables.tolist() == [[7, 0, 0, 0, 0], [2, 9, 5, 4, 6]]
    assert meta.last_token_indices().tolist() == [2, 3]
    assert not meta.is_decode_only
    assert build_attention_metadata([1, 1], [5, 9], [[1, 2], [3, 4, 5]], 4)[1].is_decode_only


def test_chunked_prefill_mixed_with_decodes_equals_dense() -> None:
    lengths = [9, 13, 6]
    seqs = random_seqs(lengths)
    tables = [[5, 1, 30], [2, 17, 8, 11], [0, 3]]  # scattered, out of order, block 0 used too
    schedule = [[5, 0, 6], [1, 7, 0], [1, 6, 0], [1, 0, 0], [1, 0, 0]]  # prefill chunks, decodes
    outputs = run_steps(seqs, schedule, tables)
    for (q, k, v), chunks in zip(seqs, outputs):
        torch.testing.assert_close(torch.cat(chunks), dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_mixed_step_with_several_decodes_between_prefill_chunks_equals_dense() -> None:
    """A step's decodes (here rows 0 and 8 of 14) are attended in one batched call, the prefill
    chunks between them one by one; every output lands in its own rows."""
    lengths = [9, 13, 6, 5]
    seqs = random_seqs(lengths)
    tables = [[5, 1, 30], [2, 17, 8, 11], [0, 3], [12, 20]]
    schedule = [[5, 0, 5, 0], [1, 7, 1, 5], [1, 6, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    outputs = run_steps(seqs, schedule, tables)
    for (q, k, v), chunks in zip(seqs, outputs):
        torch.testing.assert_close(torch.cat(chunks), dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_decode_fast_path_equals_dense() -> None:
    seqs = random_seqs([7, 12, 3])
    tables = [[4, 9], [1, 2, 3], [6]]
    cache = torch.zeros(2, 16, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    for (q, k, v), table in zip(seqs, tables):
        _, meta = build_attention_metadata([len(q)], [len(q)], [table], BLOCK_SIZE)
        write_kv(cache, k, v, meta.slot_mapping)
    _, meta = build_attention_metadata([1, 1, 1], [7, 12, 3], tables, BLOCK_SIZE)
    q_last = torch.stack([q[-1] for q, _, _ in seqs])  # [3, heads, d]
    fast = _decode_attention(q_last, cache, meta, HEAD_DIM**-0.5)
    expected = torch.stack([dense_attention(q, k, v)[-1] for q, k, v in seqs])
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_shapes_and_bytes() -> None:
    config = ModelConfig.from_dict(CONFIG)  # 4 KV heads of 16
    caches = allocate_kv_caches(config, ParallelContext(), 3, 10, 16, torch.float16, "cpu")
    assert [tuple(c.shape) for c in caches] == [(2, 10, 16, 4, 16)] * 3
    assert kv_bytes_per_block(config, ParallelContext(), 3, 16, torch.float16) == 2 * 3 * 16 * 4 * 16 * 2
    assert sum(c.numel() * c.element_size() for c in caches) == 10 * kv_bytes_per_block(
        config, ParallelContext(), 3, 16, torch.float16
    )

"""The Triton paged-attention kernels against the plain-torch reference: run by the Triton interpreter on
CPU, and compiled on a GPU where one is present (inputs go there, results come back).

Every accuracy case reads a cache whose unreadable slots (past seq_len, table padding, unused blocks) hold NaN,
so a kernel that reads one, or skips a position it should see, fails.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from services.model import triton_attention  # noqa: E402
from services.model.attention import (  # noqa: E402
    AttentionMetadata,
    _decode_attention,
    _prefill_attention,
    build_attention_metadata,
)

GQA = dict(heads=8, kv_heads=2, head_dim=32, block_size=16)
MHA = dict(heads=4, kv_heads=4, head_dim=16, block_size=8)
GROUP_OF_3 = dict(heads=6, kv_heads=2, head_dim=16, block_size=16)  # Llama-3.2-3B's 24 / 8
KERNELS = ("_decode_split_kernel", "_prefill_kernel")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def paged_case(query_lens, seq_lens, width, heads, kv_heads, head_dim, block_size):
    """(q [T, H, D], cache [2, N, block_size, kvh, d], meta): shuffled blocks, tables [S, width] padded
    with blocks no sequence owns; the shapes depend on the lengths' count and width alone."""
    torch.manual_seed(0)
    needed = [math.ceil(n / block_size) for n in seq_lens]
    assert max(needed) <= width
    ids = torch.randperm((len(seq_lens) + 1) * width).tolist()  # as many blocks for any seq_lens
    owned, spare = ids[: sum(needed)], ids[sum(needed) :]
    starts = [sum(needed[:i]) for i in range(len(needed))]
    tables = [owned[start : start + n] + spare[: width - n] for start, n in zip(starts, needed)]
    cache = torch.randn(2, len(ids), block_size, kv_heads, head_dim)
    q = torch.randn(sum(query_lens), heads, head_dim)
    _, meta = build_attention_metadata(query_lens, seq_lens, tables, block_size)
    return q, cache, meta


def poisoned(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """cache with NaN in every slot that no position [0, seq_len) of any sequence maps to."""
    block_size, kv_heads, head_dim = cache.shape[2:]
    readable = torch.zeros(cache.shape[1] * block_size, dtype=torch.bool)  # [num_slots]
    for i, seq_len in enumerate(meta.seq_lens):
        pos = torch.arange(seq_len)
        readable[meta.block_tables[i, pos // block_size] * block_size + pos % block_size] = True
    out = cache.clone()
    out.view(2, -1, kv_heads, head_dim)[:, ~readable] = float("nan")
    return out


def decode(q, cache, meta, num_splits=None, seq_lens=None):
    seq_lens = meta.seq_lens_tensor.int() if seq_lens is None else seq_lens
    scale = q.shape[-1] ** -0.5
    return triton_attention.paged_decode_attention(
        q.to(DEVICE), cache.to(DEVICE), meta.block_tables.int().to(DEVICE), seq_lens.to(DEVICE), scale, num_splits,
    ).cpu()  # fmt: skip


def prefill(q, cache, meta):
    query_lens = [b - a for a, b in zip(meta.query_starts, meta.query_starts[1:])]
    return triton_attention.paged_prefill_attention(
        q.to(DEVICE), cache.to(DEVICE), meta.block_tables.int().to(DEVICE), meta.seq_lens_tensor.int().to(DEVICE),
        meta.query_start_loc.int().to(DEVICE), max(query_lens), q.shape[-1] ** -0.5,
    ).cpu()  # fmt: skip


@pytest.mark.skipif(ON_GPU, reason="compiled on the GPU")
def test_kernels_run_under_the_interpreter() -> None:
    for name in KERNELS:
        assert isinstance(getattr(triton_attention, name), InterpretedFunction), name


def test_default_num_splits_from_longest_context_and_batch() -> None:
    by_length = [triton_attention._default_num_splits(n, 8, 132) for n in (16, 511, 512, 1024, 4096, 1 << 20)]
    assert by_length == [1, 1, 2, 4, 16, 16]
    # B * KVH programs per split; 4 per SM on 132 SMs are 528, a split more only below that
    by_occupancy = [triton_attention._default_num_splits(1 << 20, n, 132) for n in (8, 64, 128, 256, 512, 2048)]
    assert by_occupancy == [16, 8, 4, 2, 1, 1]


@pytest.mark.parametrize("num_splits", [1, 3, None])  # None: 640 // 256 = 2 splits of 320 positions
def test_decode_gqa_matches_reference(num_splits) -> None:
    # 1, exactly one block, one past it, and 500 that spans splits; 3 splits of 256 leave the third empty.
    q, cache, meta = paged_case([1] * 5, [1, 16, 17, 100, 500], width=40, **GQA)
    out = decode(q, poisoned(cache, meta), meta, num_splits)
    torch.testing.assert_close(out, _decode_attention(q, cache, meta, q.shape[-1] ** -0.5), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [MHA, GROUP_OF_3], ids=["mha", "group_of_3"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_other_head_groups_match_reference(shape, num_splits) -> None:
    q, cache, meta = paged_case([1] * 4, [1, 8, 9, 70], width=12, **shape)
    out = decode(q, poisoned(cache, meta), meta, num_splits)
    torch.testing.assert_close(out, _decode_attention(q, cache, meta, q.shape[-1] ** -0.5), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_empty_sequence_gives_zeros(num_splits) -> None:
    q, cache, meta = paged_case([1] * 3, [5, 40, 70], width=8, **GQA)
    seq_lens = meta.seq_lens_tensor.int()
    seq_lens[1] = 0
    out = decode(q, cache, meta, num_splits, seq_lens)
    expected = _decode_attention(q, cache, meta, q.shape[-1] ** -0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], atol=1e-5, rtol=1e-4)


def test_split_decode_leaves_its_tickets_at_zero_and_repeats_bit_for_bit() -> None:
    """The last split of each (sequence, KV head) combines and resets its counter: a second launch
    (the next layer, or a graph replay) finds every counter at zero and computes the same bits."""
    q, cache, meta = paged_case([1] * 3, [40, 300, 129], width=40, **GQA)
    first = decode(q, cache, meta, num_splits=5)
    tickets = triton_attention._tickets(torch.empty(0, device=DEVICE).device)
    assert not tickets.any()
    second = decode(q, cache, meta, num_splits=5)
    assert torch.equal(first, second) and not tickets.any()
    torch.testing.assert_close(first, _decode_attention(q, cache, meta, q.shape[-1] ** -0.5), atol=1e-5, rtol=1e-4)


class LaunchRecorder:
    """Stands in for a jitted kernel: records the grid and arguments (tensors by shape), then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            described = [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.launches.append((grid, described, kwargs))
            self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_launches_depend_on_shapes_only(monkeypatch, num_splits) -> None:
    """What a CUDA graph captures must not change with the values in seq_lens."""
    decode_kernels = KERNELS[:1]
    recorders = [LaunchRecorder(getattr(triton_attention, name)) for name in decode_kernels]
    for name, recorder in zip(decode_kernels, recorders):
        monkeypatch.setattr(triton_attention, name, recorder)
    for seq_lens in ([1, 1, 1], [600, 17, 64]):
        q, cache, meta = paged_case([1] * 3, seq_lens, width=40, **GQA)
        decode(q, cache, meta, num_splits)
    for recorder in recorders:
        first, second = recorder.launches
        assert first == second
    assert recorders[0].launches[0][0] == (3, 2, num_splits or 2)


@pytest.mark.parametrize(
    "shape, query_lens, seq_lens",
    [
        # a decode row, a chunk after a cached prefix, a whole prompt, a chunk ending on a block boundary
        (GQA, [1, 20, 33, 3], [37, 50, 33, 16]),  # 33 queries: tiles of 32 tokens x 4 heads
        (MHA, [130, 1, 9], [130, 8, 40]),  # 130 queries: tiles of 128
        (GROUP_OF_3, [50, 1, 4], [60, 5, 4]),  # tiles of 42 tokens x 3 heads
    ],
    ids=["gqa", "mha", "group_of_3"],
)
def test_prefill_matches_reference(shape, query_lens, seq_lens) -> None:
    q, cache, meta = paged_case(query_lens, seq_lens, width=18, **shape)
    out = prefill(q, poisoned(cache, meta), meta)
    torch.testing.assert_close(out, _prefill_attention(q, cache, meta, q.shape[-1] ** -0.5), atol=1e-5, rtol=1e-4)


def test_bf16_matches_float32_reference() -> None:
    q, cache, meta = paged_case([1, 20, 33], [37, 50, 33], width=8, **GQA)
    q16, cache16 = q.bfloat16(), poisoned(cache, meta).bfloat16()
    scale = q.shape[-1] ** -0.5
    expected = _prefill_attention(q16.float(), cache.bfloat16().float(), meta, scale)
    out = prefill(q16, cache16, meta)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    last = torch.tensor(meta.query_starts[1:]) - 1  # each sequence's last token, as a decode step
    _, decode_meta = build_attention_metadata([1] * 3, meta.seq_lens, meta.block_tables.tolist(), meta.block_size)
    out = decode(q16[last].contiguous(), cache16, decode_meta, num_splits=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected[last], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("shape", [GQA, GROUP_OF_3], ids=["gqa", "group_of_3"])
def test_decode_with_the_rotary_equals_rotary_and_cache_then_decode(shape, num_splits) -> None:
    """rotary=(cos, sin, slots): q of unrotated qkv rows; the kernel rotates q and k and writes
    this step's k and v itself, before it reads them (their slots start as NaN)."""
    from services.model.attention import write_kv
    from services.model.layers import split_qkv_rotated

    heads, kv_heads, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q, cache, meta = paged_case([1] * 5, [1, 16, 17, 100, 500], width=40, **shape)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * d)
    angles = torch.randn(5, d // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q_rot, k_rot, v = split_qkv_rotated(qkv, cos, sin, heads, kv_heads, d)
    expected_cache = cache.clone()
    write_kv(expected_cache, k_rot, v, meta.slot_mapping)
    expected = _decode_attention(q_rot, expected_cache, meta, d**-0.5)

    cache_in = poisoned(cache, meta)
    cache_in.view(2, -1, kv_heads, d)[:, meta.slot_mapping] = float("nan")  # not yet written
    cache_dev = cache_in.to(DEVICE)
    qkv_dev = qkv.to(DEVICE)
    out = triton_attention.paged_decode_attention(
        qkv_dev[:, : heads * d].view(5, heads, d), cache_dev, meta.block_tables.int().to(DEVICE),
        meta.seq_lens_tensor.int().to(DEVICE), d**-0.5, num_splits,
        rotary=(cos.to(DEVICE), sin.to(DEVICE), meta.slot_mapping.to(DEVICE))).cpu()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    slots = meta.slot_mapping
    written = cache_dev.cpu().view(2, -1, kv_heads, d)[:, slots]
    torch.testing.assert_close(written, expected_cache.view(2, -1, kv_heads, d)[:, slots],
                               atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv_dev.cpu(), qkv), "the qkv rows are read, not rotated in place"


def test_decode_with_the_rotary_refuses_q_that_is_not_of_fused_rows() -> None:
    q, cache, meta = paged_case([1] * 2, [3, 9], width=4, **GQA)
    cos = sin = torch.ones(2, GQA["head_dim"])
    with pytest.raises(ValueError, match="fused qkv rows"):
        triton_attention.paged_decode_attention(
            q.transpose(0, 1).contiguous().transpose(0, 1), cache, meta.block_tables.int(),
            meta.seq_lens_tensor.int(), 0.1, rotary=(cos, sin, meta.slot_mapping))

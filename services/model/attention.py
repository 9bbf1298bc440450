"""Paged attention in plain torch.

KV cache of one layer, on one rank:

    kv_cache [2, num_blocks, block_size, num_kv_heads_per_rank, head_dim]
              ^ 0 = K, 1 = V
    flat slot s = block_id * block_size + offset    (K of slot s: kv_cache[0].view(-1, kvh, d)[s])

    sequence with block_table [7, 2, 9], block_size 4, seq_len 10:
      positions  0 1 2 3 | 4 5 6 7 | 8 9
      block      7       | 2       | 9
      slot       28..31  | 8..11   | 36 37

Tokens of a batch are flattened sequence after sequence; sequence i owns tokens
[query_start_loc[i], query_start_loc[i+1]) and those are the LAST query_len positions of its
seq_lens[i] context positions (cached + new). Each token attends to every position of its sequence
up to and including its own: causal with offset seq_len - query_len.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.model.config import ModelConfig
from services.model.parallel import ParallelContext, kv_heads_per_rank


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: where this step's K/V go
    query_start_loc: torch.Tensor  # [num_seqs + 1] long: cumulative query lengths
    seq_lens: list[int]  # context length of each sequence after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] long, padded with 0
    block_size: int
    # Host copy of query_start_loc and device copy of seq_lens; made here unless the caller,
    # who built both from host lists, passes them (saves a device sync per step).
    query_starts: list[int] | None = None
    seq_lens_tensor: torch.Tensor | None = None  # [num_seqs] int, on the device
    max_query_len: int = 0  # 0 = from query_starts
    # Which kernels attend: "torch" (the reference, CPU default) or "triton" (CUDA; on CPU
    # under TRITON_INTERPRET=1). Both read the same cache layout and metadata.
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.query_starts is None:
            self.query_starts = self.query_start_loc.tolist()
        if self.seq_lens_tensor is None:
            self.seq_lens_tensor = torch.tensor(self.seq_lens, device=self.block_tables.device)
        if not self.max_query_len:
            starts = self.query_starts
            self.max_query_len = max(b - a for a, b in zip(starts, starts[1:]))

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_starts[-1]

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs

    def last_token_indices(self) -> torch.Tensor:
        """[num_seqs]: the token index of each sequence's last query token (where to sample)."""
        return self.query_start_loc[1:] - 1


def build_attention_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Builds (positions [num_tokens], metadata) for one step from per-sequence host lists.

    query_lens[i] new tokens of sequence i are at positions [seq_lens[i] - query_lens[i], seq_lens[i]).
    """
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    s_lens = torch.tensor(seq_lens, dtype=torch.long)
    if bool((q_lens < 1).any()) or bool((q_lens > s_lens).any()):
        raise ValueError(f"need 1 <= query_len <= seq_len per sequence, got {list(query_lens)} / {list(seq_lens)}")
    query_start_loc = F.pad(torch.cumsum(q_lens, 0), (1, 0))  # [num_seqs + 1]
    table = _pad_block_tables(block_tables)  # [num_seqs, max_blocks]
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)  # [num_tokens]
    offset_in_query = torch.arange(int(q_lens.sum())) - query_start_loc[seq_of_token]
    positions = (s_lens - q_lens)[seq_of_token] + offset_in_query  # [num_tokens]
    blocks = table[seq_of_token, positions // block_size]
    slot_mapping = blocks * block_size + positions % block_size  # [num_tokens]
    # Everything in one host buffer: one copy to the device per step.
    parts = (positions, slot_mapping, query_start_loc, s_lens, table.flatten())
    on_device = to_device(torch.cat(parts), device).split([len(x) for x in parts])
    positions_d, slots_d, query_start_d, seq_lens_d, table_d = on_device
    meta = AttentionMetadata(
        slot_mapping=slots_d,
        query_start_loc=query_start_d,
        seq_lens=list(seq_lens),
        block_tables=table_d.view(table.shape),
        block_size=block_size,
        query_starts=query_start_loc.tolist(),
        seq_lens_tensor=seq_lens_d,
    )
    return positions_d, meta


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on device; to a GPU through pinned memory, without blocking the host."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _pad_block_tables(block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(row) for row in block_tables)
    return torch.tensor([list(row) + [0] * (width - len(row)) for row in block_tables], dtype=torch.long)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q [n, heads, d], k/v [n, kv_heads, d] of this step -> [n, heads, d].

    Writes k/v into the cache at meta.slot_mapping, then attends over the cache with the
    backend the metadata names.
    """
    write_kv(kv_cache, k, v, meta.slot_mapping)
    return attend(q, kv_cache, meta)


ROTARY_IN_DECODE = True  # False: the Triton backend's decode steps run the rotary kernel first


def rotates_in_decode(meta: AttentionMetadata) -> bool:
    """Whether this step's attention takes its qkv unrotated (attend_rotating): a decode step
    of the Triton backend, whose kernel rotates q and k and writes the cache itself."""
    return ROTARY_IN_DECODE and meta.backend == "triton" and meta.is_decode_only


def attend_rotating(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: torch.Tensor, meta: AttentionMetadata, num_heads: int,
                    num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [n, (heads + 2 kv_heads) d] of a decode step (rotates_in_decode), q and k not yet
    rotated by cos/sin [n, d] -> [n, heads, d]: rotary_and_cache and attend in one kernel."""
    from services.model import triton_attention

    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not {num_heads} + 2 x {num_kv_heads} heads")
    q = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    return triton_attention.paged_decode_attention(
        q, kv_cache, meta.block_tables, meta.seq_lens_tensor, head_dim**-0.5,
        rotary=(cos.contiguous(), sin.contiguous(), meta.slot_mapping))


def attend(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q [n, heads, d] -> [n, heads, d] over a cache that already holds this step's K/V."""
    scale = q.shape[-1] ** -0.5
    if meta.backend == "triton":
        return _triton_attention(q, kv_cache, meta, scale)
    if meta.is_decode_only:
        return _decode_attention(q, kv_cache, meta, scale)
    return _prefill_attention(q, kv_cache, meta, scale)


def _triton_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    from services.model import triton_attention  # triton is needed only by this backend

    if meta.is_decode_only:  # q may be a view into the fused qkv: the kernel takes its strides
        return triton_attention.paged_decode_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens_tensor, scale)
    return triton_attention.paged_prefill_attention(
        q.contiguous(), kv_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc,
        meta.max_query_len, scale)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)  # [num_slots, kvh, d]
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather_context(kv_cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [..., nb] -> keys, values [..., nb * block_size, kv_heads, d] (block order kept).

    One index_select over the block axis copies K and V together (on CPUs 2-3x faster than
    advanced indexing of each: whole blocks are contiguous rows)."""
    block_size, kv_heads, head_dim = kv_cache.shape[2:]
    kv = kv_cache.index_select(1, blocks.reshape(-1))  # [2, prod(...) · nb, block_size, kvh, d]
    kv = kv.view(2, *blocks.shape[:-1], blocks.shape[-1] * block_size, kv_heads, head_dim)
    return kv[0], kv[1]


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: every sequence at once (_batched_decode)."""
    return _batched_decode(q, kv_cache, meta.block_tables, meta.seq_lens, meta.seq_lens_tensor,
                           meta.block_size, scale)


def _batched_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: Sequence[int], seq_lens_tensor: torch.Tensor, block_size: int,
                    scale: float) -> torch.Tensor:
    """q [B, heads, d], the last query of each of B sequences -> [B, heads, d]: every context
    padded to the longest and masked, in one SDPA call."""
    num_blocks = math.ceil(max(seq_lens) / block_size)
    keys, values = _gather_context(kv_cache, block_tables[:, :num_blocks])  # [B, L, kvh, d]
    max_len = keys.shape[1]
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens_tensor[:, None]  # [B, L]
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    # GQA without repeating K/V: the group's query heads are the query rows of their KV head.
    out = F.scaled_dot_product_attention(
        q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim),  # [B, kvh, group, d]
        keys.transpose(1, 2),  # [B, kvh, L, d]
        values.transpose(1, 2),
        attn_mask=valid[:, None, None, :],  # [B, 1, 1, L]
        scale=scale,
    )
    return out.reshape(batch, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Any mix of prefill chunks and decodes: the decodes in one batched call, then one SDPA
    call per prefill chunk."""
    starts = meta.query_starts
    decodes = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
    if len(decodes) < 2:
        decodes = []  # one decode costs as much either way
    out = torch.empty_like(q)
    if decodes:
        rows = torch.tensor([starts[i] for i in decodes], device=q.device)
        seqs = torch.tensor(decodes, device=q.device)
        out[rows] = _batched_decode(q[rows], kv_cache, meta.block_tables[seqs],
                                    [meta.seq_lens[i] for i in decodes],
                                    meta.seq_lens_tensor[seqs], meta.block_size, scale)
    done = set(decodes)
    for i, seq_len in enumerate(meta.seq_lens):
        if i in done:
            continue
        start, end = starts[i], starts[i + 1]
        num_blocks = math.ceil(seq_len / meta.block_size)
        keys, values = _gather_context(kv_cache, meta.block_tables[i, :num_blocks])
        out[start:end] = _causal_sdpa(q[start:end], keys[:seq_len], values[:seq_len], scale)
    return out


def _causal_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, heads, d], keys/values [seq_len, kvh, d]; query j sits at seq_len - q_len + j."""
    q_len, seq_len = q.shape[0], keys.shape[0]
    mask = None
    if q_len != seq_len:
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]  # [q_len, 1]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos  # [q_len, seq_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # [heads, q_len, d]
        keys.transpose(0, 1),  # [kvh, seq_len, d]
        values.transpose(0, 1),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)  # [q_len, heads, d]


def allocate_kv_caches(
    config: ModelConfig,
    ctx: ParallelContext,
    num_layers_in_stage: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, num_kv_heads_per_rank, head_dim] per layer of the stage."""
    shape = (2, num_blocks, block_size, kv_heads_per_rank(config.num_key_value_heads, ctx.tp_size), config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers_in_stage)]


def kv_bytes_per_block(
    config: ModelConfig, ctx: ParallelContext, num_layers_in_stage: int, block_size: int, dtype: torch.dtype
) -> int:
    """Bytes one KV block costs on this rank, over all layers of its stage (K and V)."""
    num_kv_heads = kv_heads_per_rank(config.num_key_value_heads, ctx.tp_size)
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers_in_stage * block_size * num_kv_heads * config.head_dim * element_size

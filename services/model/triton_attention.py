"""Paged attention in Triton for CUDA GPUs: split-KV decode (flash decoding) and causal prefill.

Same cache layout and semantics as services.model.attention (the plain-torch reference):

    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]    (0 = K, 1 = V)
    position p of sequence i lives in block block_tables[i, p // block_size], slot p % block_size

Math, for one query row q (one head of one token) over the positions P it sees, in float32 and in
base 2 (c = scale * log2(e)):

    s_p = c * q . k_p                              o = sum_p 2^s_p v_p / sum_p 2^s_p
    online softmax, tile after tile of BLOCK_N positions:
        m' = max(m, max_p s_p)
        l' = l * 2^(m - m') + sum_p 2^(s_p - m')
        a' = a * 2^(m - m') + sum_p 2^(s_p - m') v_p          o = a / l,  lse = m + log2(l)

GQA: the GROUP = H // KVH query heads that read KV head g are rows of one tile (padded for tl.dot),
so each K/V tile is loaded once per group. Query head h reads KV head h // GROUP.

Decode, one kernel, grid (B, KVH, num_splits): split s covers positions [s * L, (s + 1) * L) of
[0, seq_len), L = seq_len / num_splits rounded up to a multiple of BLOCK_N (read from seq_len in the
kernel, so a short context spreads over as many programs as its tiles allow), and writes o_s and
lse_s (-inf when its range is empty) to a float32 workspace [B, H, num_splits, (D)]. Then it takes
a ticket (an atomic counter per (sequence, KV head)); the split that arrives last combines them
for the group's heads, in split order (the same bits whatever the arrival order), and resets the
counter for the next launch:

    o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),    M = max_s lse_s

(a second kernel for that costs a launch per layer, ~1-2 us at batch 1 on an H200). With one
split the kernel writes the output itself. The grid and every launch argument come from shapes
(B, H, KVH, W, block_size, D) and the GPU's SM count alone; seq_lens is read inside the kernel and
the counters persist (zero between launches), so the decode call can be captured in a CUDA graph.

Prefill, grid (ceil(max_query_len / BLOCK_Q), KVH, S): a tile is BLOCK_Q tokens x GROUP heads of one
sequence. Query j of a sequence with q_len queries sits at position seq_len - q_len + j and sees
positions [0, that position]; the tile walks the pages up to its last query's position.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from services.model import triton_pdl
from services.model.triton_pdl import pdl_begin

_DECODE_TILE = 64  # positions per K/V tile in decode (BLOCK_N)
_PREFILL_ROWS = 128  # query rows (tokens x group heads) per prefill tile (BLOCK_M)
_PREFILL_TILE = 32  # positions per K/V tile in prefill (BLOCK_N)
_MIN_SPLIT_POSITIONS = 256  # a default decode split covers at least this many possible positions
_MAX_SPLITS = 16
# Default splits stop before B * KVH * splits passes this many programs per SM: a split costs its
# partials and a combine, and past ~4 programs per SM it no longer pays (bench/tune_attention.py
# on an H200: at 64 sequences one split beat three by 1.1-1.3x, at 16 four to eight splits beat nine)
_PROGRAMS_PER_SM = 4
_INTERPRETER_NUM_SMS = 132  # on CPU (the Triton interpreter) split as on an H200
_NUM_WARPS = 4
_MAX_TICKETS = 1 << 16  # (sequence, KV head) counters per device: B * KVH of a split decode


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int = _DECODE_TILE,
    num_warps: int = _NUM_WARPS,
    num_stages: int | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last position -> [B, H, D] in q.dtype.

    block_tables [B, W], seq_lens [B] int32 on the device (this step's token included).
    num_splits, block_n (positions per K/V tile), num_warps and num_stages (Triton's software
    pipelining of the tile loop; None: Triton's default) default to the module's choice
    (bench/tune_attention.py measures others).

    rotary = (cos, sin [B, D], slot_mapping [B]): q is the q heads of this step's fused qkv rows,
    not yet rotated, its KV heads' k and v following in the same rows, and this step's k and v
    not yet in the cache. The kernel then does what triton_ops.rotary_and_cache would have done
    first: each program rotates the q heads it reads, and the one whose split holds the last
    position rotates that KV head's k and writes it and v at the slot before it reads the cache.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = _group_size(q, kv_cache)
    max_positions = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _default_num_splits(max_positions, batch * num_kv_heads, _num_sms(q.device))
    if batch * num_kv_heads > _MAX_TICKETS:
        num_splits = 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, D]
    # Workspace [B, H, num_splits, D] and [B, H, num_splits]; one split writes the output (unused).
    partial = out if num_splits == 1 else q.new_empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32)
    lse = q.new_empty((batch, num_heads, num_splits), dtype=torch.float32)
    if rotary is not None:
        cos, sin, slot_mapping = rotary
        if q.stride(1) != head_dim or cos.stride(0) != head_dim or sin.stride(0) != head_dim:
            raise ValueError("rotating decode attention needs q heads of fused qkv rows and "
                             "contiguous cos/sin rows")
    else:
        cos = sin = slot_mapping = q  # not read
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, partial, lse, out, _tickets(q.device),
        cos, sin, slot_mapping,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        *_cache_strides(kv_cache), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q),
        SPLIT=num_splits > 1, SPLITS_PAD=triton.next_power_of_2(num_splits),
        GROUP_P2=triton.next_power_of_2(group),
        PREFETCH_POSITIONS=block_n if triton_pdl.PREFETCH_KV else 0, ROTATE=rotary is not None,
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}), **triton_pdl.kwargs(q.device),
    )  # fmt: skip
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D], sequence i's queries at rows [query_start_loc[i], query_start_loc[i+1]) -> [T, H, D].

    Those are its last q_len of seq_lens[i] positions, each attending causally (any mix of prefill
    chunks, cached prefixes and decodes). query_start_loc [S + 1], seq_lens [S] int32 on the device.
    """
    num_kv_heads = kv_cache.shape[3]
    group = _group_size(q, kv_cache)
    if not q.is_contiguous():
        raise ValueError("prefill attention needs a contiguous q (its output takes q's layout)")
    block_m = max(_PREFILL_ROWS, triton.next_power_of_2(group))
    block_q = block_m // group  # tokens per tile
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, seq_lens.shape[0])
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        *_cache_strides(kv_cache), block_tables.stride(0),
        GROUP=group, HEAD_DIM=q.shape[2], BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=_PREFILL_TILE, DOT_PRECISION=_dot_precision(q),
        num_warps=_NUM_WARPS, **triton_pdl.kwargs(q.device),
    )  # fmt: skip
    return out


def _default_num_splits(max_positions: int, num_programs: int, num_sms: int) -> int:
    """Decode splits, from shapes alone: each covers >= 256 of the max_positions = W * block_size possible
    positions, at most 16, and no more than keep the B * KVH = num_programs of one split within
    _PROGRAMS_PER_SM programs per SM (at least one split)."""
    by_length = max_positions // _MIN_SPLIT_POSITIONS
    by_occupancy = _PROGRAMS_PER_SM * num_sms // num_programs
    return max(1, min(_MAX_SPLITS, by_length, by_occupancy))


@functools.cache
def _tickets(device: torch.device) -> torch.Tensor:
    """The split decode's arrival counters on device, zero between launches (each launch's last
    split resets its own). Allocated by the first decode call, which runs eagerly before any
    CUDA graph is captured (a graph then keeps reading this same memory)."""
    return torch.zeros(_MAX_TICKETS, dtype=torch.int32, device=device)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _group_size(q: torch.Tensor, kv_cache: torch.Tensor) -> int:
    """Query heads per KV head, once q [n, H, D] and kv_cache [2, N, block_size, KVH, D] are seen to fit."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads or kv_cache.shape[4] != head_dim or kv_cache.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype}")
    if head_dim & (head_dim - 1) or q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError(f"need a power-of-two head_dim, contiguous q heads and kv_cache rows, got {tuple(q.shape)}")
    return num_heads // num_kv_heads


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(K -> V, block, slot, head) strides of kv_cache [2, num_blocks, block_size, kvh, d]."""
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _dot_precision(q: torch.Tensor) -> str:
    """float32 inputs get exact products (no TF32); 16-bit inputs run on tensor cores either way."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _load_kv_tile(
    kv_ptr, table_row_ptr, pos, in_range, kv_head,
    stride_kv, stride_block, stride_slot, stride_head,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """K^T [HEAD_DIM, BLOCK_N] and V [BLOCK_N, HEAD_DIM] at positions pos [BLOCK_N]; 0 outside in_range."""
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    slot = block * stride_block + (pos % BLOCK_SIZE) * stride_slot + kv_head * stride_head  # [BLOCK_N]
    d = tl.arange(0, HEAD_DIM)
    # K loaded as rows (each position's head_dim contiguous: coalesced), transposed in registers
    k = tl.load(kv_ptr + slot[:, None] + d[None, :], mask=in_range[:, None], other=0.0)
    k_t = tl.trans(k)
    v = tl.load(kv_ptr + stride_kv + slot[:, None] + d[None, :], mask=in_range[:, None], other=0.0)
    return k_t, v


@triton.jit
def pdl_begin_prefetching_kv(
    PDL: tl.constexpr, kv_ptr, table_row_ptr, start, end, kv_head,
    stride_kv, stride_block, stride_slot, stride_head,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, POSITIONS: tl.constexpr,
):  # fmt: skip
    """triton_pdl.pdl_begin, first asking L2 for the K and V rows of positions [start, start +
    POSITIONS) ∩ [start, end) of one KV head (their blocks read from the table row, a step
    input). A prefetch reads no data into the program, so rows this step's kernels still write
    are no hazard: L2 holds the newest bytes of a line whatever asked for it."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if POSITIONS > 0:
            pos = start + tl.arange(0, POSITIONS)
            in_range = pos < end
            block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
            row = block * stride_block + (pos % BLOCK_SIZE) * stride_slot + kv_head * stride_head
            LINE: tl.constexpr = 1024 // kv_ptr.dtype.element_ty.primitive_bitwidth  # elements
            NUM_LINES: tl.constexpr = (HEAD_DIM + LINE - 1) // LINE
            lines = kv_ptr + tl.where(in_range, row, 0)[:, None] + (tl.arange(0, NUM_LINES) * LINE)[None, :]
            for kv in tl.static_range(2):  # K, then V
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l",
                                          [lines + kv * stride_kv], dtype=tl.int32,
                                          is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()


@triton.jit
def _online_softmax_step(q, k_t, v, visible, m, l, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """Folds one tile into (m [M], l [M], acc [M, D]); visible [M, BLOCK_N].

    Every tile a kernel visits shows each row at least one position, or one was shown before (m is
    finite), so m - m_new is never -inf - -inf.
    """
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [M, BLOCK_N], base 2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, partial_ptr, lse_ptr, out_ptr, tickets_ptr,
    cos_ptr, sin_ptr, slot_mapping_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kv, stride_block, stride_slot, stride_head, stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr,
    GROUP_P2: tl.constexpr, PREFETCH_POSITIONS: tl.constexpr, ROTATE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): partial [B, H, splits, D] and lse [B, H, splits]; the last
    split of (sequence, KV head) to finish combines them into out [B, H, D]. ROTATE: q and this
    step's k are rotated here, and k and v written to the cache (paged_decode_attention's
    rotary)."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_kv_heads, num_splits = tl.num_programs(1), tl.num_programs(2)
    # seq_lens and block_tables are step inputs: uploaded, or gathered by torch kernels, before
    # the step's first layer, with ordinary stream-ordered kernels between (the rotary angles,
    # the embedding), and a kernel launched without PDL starts only once all before it finished.
    # So they may be read before the PDL wait, and the first tile's K/V asked into L2.
    seq_len = tl.load(seq_lens_ptr + seq)
    positions_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * positions_per_split
    end = tl.minimum(start + positions_per_split, seq_len)
    pdl_begin_prefetching_kv(
        PDL, kv_ptr, block_tables_ptr + seq * stride_table, start, end, kv_head,
        stride_kv, stride_block, stride_slot, stride_head, BLOCK_SIZE, HEAD_DIM, PREFETCH_POSITIONS,
    )  # fmt: skip
    num_heads = GROUP * num_kv_heads
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows  # [GROUP_PAD]
    is_head = rows < GROUP
    d = tl.arange(0, HEAD_DIM)
    q_row = q_ptr + seq * stride_qb
    q = tl.load(q_row + heads[:, None] * stride_qh + d[None, :], mask=is_head[:, None], other=0.0)
    if ROTATE:
        cos = tl.load(cos_ptr + seq * HEAD_DIM + d).to(tl.float32)  # [D]: the d/2 angles twice
        sin = tl.load(sin_ptr + seq * HEAD_DIM + d).to(tl.float32)
        q = _rotated(q, q_row + heads[:, None] * stride_qh, d, cos, sin, is_head[:, None], HEAD_DIM)
        if (start < seq_len) & (end == seq_len):  # this split holds the step's own position
            k_row = q_row + (num_heads + kv_head) * HEAD_DIM
            k = tl.load(k_row + d)
            k = _rotated(k[None, :], k_row, d[None, :], cos, sin, d[None, :] < HEAD_DIM, HEAD_DIM)
            v = tl.load(q_row + (num_heads + num_kv_heads + kv_head) * HEAD_DIM + d)
            slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
            dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
                   + kv_head * stride_head + d)
            tl.store(dst[None, :], k)
            tl.store(dst + stride_kv, v)
            tl.debug_barrier()  # the block's own stores, seen by all its threads' loads below
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        in_range = pos < end
        k_t, v = _load_kv_tile(
            kv_ptr, block_tables_ptr + seq * stride_table, pos, in_range, kv_head,
            stride_kv, stride_block, stride_slot, stride_head, BLOCK_SIZE, HEAD_DIM,
        )  # fmt: skip
        m, l, acc = _online_softmax_step(q, k_t, v, in_range[None, :], m, l, acc, qk_scale, DOT_PRECISION)
    # An empty split (l = 0) writes o = 0 and lse = -inf: it weighs nothing in the reduction.
    has_any = l > 0
    o = acc / tl.where(has_any, l, 1.0)[:, None]  # [GROUP_PAD, HEAD_DIM]
    if not SPLIT:
        out_rows = seq * num_heads + heads
        tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=is_head[:, None])
    else:
        row = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(partial_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=is_head[:, None])
        lse = tl.where(has_any, m + tl.log2(tl.where(has_any, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=is_head)
        # Every thread's stores, then one gpu-scope acq_rel ticket: the last split sees them all.
        tl.debug_barrier()
        ticket_ptr = tickets_ptr + seq * num_kv_heads + kv_head
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            _combine_splits(partial_ptr, lse_ptr, out_ptr, seq * num_heads + kv_head * GROUP, num_splits,
                            GROUP, GROUP_P2, HEAD_DIM, SPLITS_PAD)
            tl.store(ticket_ptr, 0)


@triton.jit
def _rotated(x, row_ptrs, d, cos, sin, mask, HEAD_DIM: tl.constexpr):
    """x [R, D] (loaded from row_ptrs + d) rotated by RoPE, in x's dtype: x·cos + rotate_half(x)·sin,
    rotate_half(x) = [-x2, x1], with the rounding of triton_ops' rotary (float32, then x's dtype).
    rotate_half is a second load of the rows with the halves swapped."""
    half: tl.constexpr = HEAD_DIM // 2
    swapped = tl.load(row_ptrs + (d + half) % HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    signed = tl.where(d < half, -swapped, swapped)
    return (x.to(tl.float32) * cos + signed * sin).to(x.dtype)


@triton.jit
def _combine_splits(partial_ptr, lse_ptr, out_ptr, first_row, num_splits,
                    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS_PAD: tl.constexpr):
    """Rows first_row .. + GROUP of out [B * H, D]: each row's partial [splits, D] weighted by
    2^lse [splits], every head of the group in one [GROUP, splits, D] tile (one round trip to L2,
    not one per head). Read through L2 (.cg): other programs wrote them after this SM may have
    cached those lines."""
    g = tl.arange(0, GROUP_P2)[:, None]  # [G, 1]
    splits = tl.arange(0, SPLITS_PAD)[None, :]  # [1, S]
    is_part = (g < GROUP) & (splits < num_splits)  # [G, S]
    part_row = (first_row + g) * num_splits + splits  # [G, S]
    lse = tl.load(lse_ptr + part_row, mask=is_part, other=float("-inf"), cache_modifier=".cg")
    max_lse = tl.max(lse, 1)  # [G]
    weight = tl.exp2(lse - tl.where(max_lse > float("-inf"), max_lse, 0.0)[:, None])  # 0 if empty
    d = tl.arange(0, HEAD_DIM)[None, None, :]
    o = tl.load(partial_ptr + part_row[:, :, None] * HEAD_DIM + d, mask=is_part[:, :, None], other=0.0,
                cache_modifier=".cg")  # [G, S, D]
    total = tl.sum(weight, 1)  # [G]; 0 only for seq_len 0, whose output is 0
    out = tl.sum(weight[:, :, None] * o, 1) / tl.where(total > 0, total, 1.0)[:, None]  # [G, D]
    rows = first_row + tl.arange(0, GROUP_P2)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(tl.arange(0, GROUP_P2) < GROUP)[:, None])


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kv, stride_block, stride_slot, stride_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One (query tile, KV head, sequence): rows are BLOCK_Q tokens x GROUP heads, token-major."""
    pdl_begin(PDL)
    tile, kv_head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    if tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // GROUP  # [BLOCK_M], among the sequence's queries
    heads = kv_head * GROUP + rows % GROUP
    is_query = (rows < BLOCK_Q * GROUP) & (token < query_len)
    query_pos = seq_len - query_len + token  # [BLOCK_M]
    d = tl.arange(0, HEAD_DIM)
    q_offsets = (query_start + token)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]  # [BLOCK_M, D]
    q = tl.load(q_ptr + q_offsets, mask=is_query[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(seq_len - query_len + (tile + 1) * BLOCK_Q, seq_len)  # past the tile's last query
    for tile_start in range(0, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        in_range = pos < end
        k_t, v = _load_kv_tile(
            kv_ptr, block_tables_ptr + seq * stride_table, pos, in_range, kv_head,
            stride_kv, stride_block, stride_slot, stride_head, BLOCK_SIZE, HEAD_DIM,
        )  # fmt: skip
        visible = (pos[None, :] <= query_pos[:, None]) & in_range[None, :]  # [BLOCK_M, BLOCK_N]
        m, l, acc = _online_softmax_step(q, k_t, v, visible, m, l, acc, qk_scale, DOT_PRECISION)
    tl.store(out_ptr + q_offsets, acc / l[:, None], mask=is_query[:, None])

"""The persistent batch: what a worker holds of every live sequence, updated in place by the
deltas of the step contract, and the per-step inputs built from it.

Each sequence owns one row of fixed-capacity tables, on the host (numpy) and on the device:

    row   held tokens (host)   block table (host mirror + device)   last sampled (device)
    0     seq 7: p0 … p99      3 8 1 4 9 2 6 5 · · ·                 id sampled at its last step
    1     seq 12: …            …                                     …

A step's inputs are built from the plan and these rows with work proportional to the step's
tokens (plus one row gather of the device block table per step), never to the context length,
and reach the device in one host-to-device copy. A decode's input id can be "what this row
sampled last": it is encoded as -(row + 1) and resolved on the device, so step N+1 is
launched before step N's ids reach the host.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from services.model.attention import AttentionMetadata, to_device
from services.step import SamplingOptions, StepPlan


@dataclass
class HeldSeq:
    row: int
    token_ids: tuple[int, ...]  # every token known when it started (SeqStart.token_ids)
    num_blocks: int
    sampling: SamplingOptions
    seed: int  # the request's seed, or one drawn at start: every draw is a pure function


@dataclass
class HostStep:
    """One step's inputs on the host, before the single copy to the device."""

    input_ids: np.ndarray  # [T] int64; -(row + 1) = the row's last sampled id
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    query_start_loc: np.ndarray  # [S + 1]
    seq_lens: np.ndarray  # [S]
    rows: np.ndarray  # [S] the persistent row of each scheduled sequence
    logits_indices: np.ndarray  # [N] token index of each sampled sequence's last token
    # (of its last K + 1 with K proposals to verify)
    sampled_rows: np.ndarray  # [N]
    table_updates: tuple[np.ndarray, np.ndarray]  # (flat index, block id) into the block table

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs

    @property
    def all_rows_sampled(self) -> bool:
        """Every token of the step is a sampled sequence's last (a decode step of samplers)."""
        return len(self.logits_indices) == self.num_tokens


@dataclass
class DeviceStep:
    input_ids: torch.Tensor  # [T] long, the markers resolved
    positions: torch.Tensor  # [T] long
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N] long
    sampled_rows: torch.Tensor  # [N] long


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device):
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.device = device
        self.seqs: dict[int, HeldSeq] = {}
        self._by_row: list[HeldSeq | None] = [None] * max_num_seqs
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))  # pop() gives row 0 first
        # One row more than sequences: the scratch row, which padded graph rows read.
        num_rows = max_num_seqs + 1
        self.scratch_row = max_num_seqs
        self.block_table_host = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int64)
        self.block_table = torch.zeros((num_rows, max_blocks_per_seq), dtype=torch.int32,
                                       device=device)
        self.last_sampled = torch.zeros(num_rows, dtype=torch.long, device=device)

    # -- the deltas --------------------------------------------------------------------------

    def drop(self, seq_ids) -> None:
        for seq_id in seq_ids:
            held = self.seqs.pop(seq_id, None)
            if held is not None:
                self._by_row[held.row] = None
                self._free_rows.append(held.row)

    def clear(self) -> None:
        self.drop(list(self.seqs))

    def _start(self, seq_id: int, token_ids: tuple[int, ...], sampling: SamplingOptions) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} started twice without being dropped")
        if not self._free_rows:
            raise RuntimeError(f"more than {self.max_num_seqs} live sequences: raise the "
                               "worker's --max-num-seqs")
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        held = HeldSeq(self._free_rows.pop(), token_ids, 0, sampling, seed)
        self.seqs[seq_id] = self._by_row[held.row] = held

    def _append_blocks(self, held: HeldSeq, block_ids, updates: list) -> None:
        end = held.num_blocks + len(block_ids)
        if end > self.max_blocks_per_seq:
            raise ValueError(f"a sequence needs {end} blocks, more than the "
                             f"{self.max_blocks_per_seq} of --max-model-len")
        self.block_table_host[held.row, held.num_blocks:end] = block_ids
        base = held.row * self.max_blocks_per_seq
        updates.append((np.arange(base + held.num_blocks, base + end), block_ids))
        held.num_blocks = end

    # -- one step ----------------------------------------------------------------------------

    def prepare(self, plan: StepPlan) -> HostStep:
        """Applies the plan's deltas and builds its inputs (O(tokens of the step))."""
        self.drop(plan.dropped_seq_ids)
        ids: list[int] = []
        rows, starts, lens, logits_indices, sampled_rows, updates = [], [], [], [], [], []
        for seq in plan.seqs:
            if seq.start is not None:
                self._start(seq.seq_id, seq.start.token_ids, seq.start.sampling)
            held = self.seqs[seq.seq_id]
            if seq.new_block_ids:
                self._append_blocks(held, seq.new_block_ids, updates)
            ids += self._input_ids(held, seq)
            rows.append(held.row)
            starts.append(seq.num_computed_tokens)
            lens.append(seq.num_new_tokens)
            if seq.sample:  # a sequence with K proposals samples at its last K + 1 tokens
                num_sampled = 1 + len(seq.draft_token_ids)
                logits_indices += range(len(ids) - num_sampled, len(ids))
                sampled_rows += [held.row] * num_sampled
        rows_a, starts_a, lens_a = (np.array(x, dtype=np.int64) for x in (rows, starts, lens))
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens_a, out=query_start_loc[1:])
        seq_of_token = np.repeat(np.arange(len(rows)), lens_a)  # [T]
        positions = (np.arange(len(ids)) - query_start_loc[seq_of_token]) + starts_a[seq_of_token]
        row_of_token = rows_a[seq_of_token]
        blocks = self.block_table_host[row_of_token, positions // self.block_size]
        slots = blocks * self.block_size + positions % self.block_size
        flat = (np.concatenate([u[0] for u in updates]) if updates else np.zeros(0, np.int64),
                np.concatenate([np.asarray(u[1], np.int64) for u in updates]) if updates
                else np.zeros(0, np.int64))
        return HostStep(np.array(ids, dtype=np.int64), positions, slots, query_start_loc,
                        starts_a + lens_a, rows_a, np.array(logits_indices, dtype=np.int64),
                        np.array(sampled_rows, dtype=np.int64), flat)

    def _input_ids(self, held: HeldSeq, seq) -> list[int]:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_new_tokens
        ids = list(held.token_ids[start:end]) if start < len(held.token_ids) else []
        ids += seq.token_ids
        if seq.append_last_sampled:
            ids.append(-(held.row + 1))
        if len(ids) != seq.num_new_tokens:
            raise ValueError(f"sequence {seq.seq_id}: the plan supplies {len(ids)} input tokens "
                             f"for {seq.num_new_tokens} new positions")
        return ids

    def to_device(self, host: HostStep, backend: str) -> DeviceStep:
        """The step's inputs on the device, from one host-to-device copy; applies its
        block-table updates on the device first."""
        parts = (host.input_ids, host.positions, host.slot_mapping, host.query_start_loc,
                 host.seq_lens, host.rows)
        (ids, positions, slots, query_start, seq_lens, rows), sampling = self.upload(parts, host)
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=query_start.to(torch.int32),
            seq_lens=host.seq_lens.tolist(),
            block_tables=self.block_table.index_select(0, rows),
            block_size=self.block_size,
            query_starts=host.query_start_loc.tolist(),
            seq_lens_tensor=seq_lens.to(torch.int32),
            max_query_len=int((host.query_start_loc[1:] - host.query_start_loc[:-1]).max()),
            backend=backend)
        return DeviceStep(self.resolve_last_sampled(ids), positions, meta, *sampling)

    def upload(self, parts, host: HostStep) -> tuple[list[torch.Tensor], tuple]:
        """Copies parts (host int64 arrays) with the step's sampling indices and block-table
        updates in one host-to-device copy; applies the updates. Returns the parts on the
        device and (logits_indices, sampled_rows) there."""
        index, blocks = host.table_updates
        tail = (host.logits_indices, host.sampled_rows, index, blocks)
        packed = to_device(torch.from_numpy(np.concatenate([*parts, *tail])), self.device)
        *on_device, logits_indices, sampled_rows, index, blocks = packed.split(
            [len(p) for p in (*parts, *tail)])
        if len(index):
            self.block_table.view(-1)[index] = blocks.to(torch.int32)
        return on_device, (logits_indices, sampled_rows)

    def resolve_last_sampled(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] with -(row + 1) markers -> real ids: the markers' rows' last sampled ids."""
        marker_rows = (-ids - 1).clamp_(min=0)
        return torch.where(ids < 0, self.last_sampled[marker_rows], ids)

    def held_at(self, rows: np.ndarray) -> list[HeldSeq]:
        return [self._by_row[int(r)] for r in rows]

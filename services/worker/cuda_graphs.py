"""CUDA graphs of the decode step: one per batch bucket, captured at worker start.

A decode step (one new token per sequence) of B sequences replays the graph of the smallest
bucket >= B; the rows past B are padding that writes its K/V into a scratch block no sequence
owns and whose outputs are ignored. A graph reads its inputs from one static device buffer,

    static [5 · bucket] int64 = | input ids | positions | slots | seq lens | rows |

which a step fills with one host-to-device copy, and it resolves "the row's last sampled id"
and gathers the step's block tables from the persistent batch inside the graph, so a replay
costs one copy (plus one on the device) and one launch whatever the model's size. The last
stage's graph ends with the logits of every row and their greedy ids, which it also writes into
the persistent batch as the rows' last sampled ids: a step of greedy requests launches nothing
after the replay but the ids' copy to the host (a step with other draws samples from the logits
after it, and its writes replace the greedy ones). A row the step does not sample (a one-token
prompt chunk) gets its argmax written too, which nothing reads: a row's last sampled id is read
only by the step right after one that sampled it. Other stages' graphs end with the residual
stream. Graphs share one memory pool and are captured from the largest bucket down, so they take
about the memory of the largest.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from services.model import comm
from services.model.attention import AttentionMetadata
from services.model.sampler import argmax_ids
from services.worker.input_batch import HostStep

NUM_STATIC_FIELDS = 5


@dataclass
class ReplayedStep:
    outputs: torch.Tensor  # [num_seqs, vocab] logits (last stage) or [num_seqs, hidden]
    greedy_ids: torch.Tensor | None  # [num_seqs] argmax of the logits, already the rows' last
    logits_indices: torch.Tensor  # [N] on the device
    sampled_rows: torch.Tensor  # [N]


def bucket_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then steps of 8 up to max_num_seqs (vLLM's capture sizes)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return tuple(sizes)


class DecodeGraphs:
    """capture=False runs each bucket's body eagerly on the same static buffers, padding and
    scratch rows included: what the CPU tests check of this path."""

    def __init__(self, runner, sizes: tuple[int, ...], capture: bool = True):
        self.runner = runner
        self.use_capture = capture
        self.sizes = tuple(sorted(sizes))
        self.max_size = self.sizes[-1]
        device = runner.device
        self.static = torch.zeros(NUM_STATIC_FIELDS * self.max_size, dtype=torch.long,
                                  device=device)
        self.hidden_in = None
        if not runner.is_first_stage:
            hidden = runner.model.config.hidden_size
            self.hidden_in = torch.zeros(self.max_size, hidden, dtype=runner.kv_caches[0].dtype,
                                         device=device)
        self.query_start_loc = torch.arange(self.max_size + 1, dtype=torch.int32, device=device)
        # Padding rows write into the scratch block (the last block of every cache) and read
        # the scratch row of the block table (its last row), which points there.
        self.scratch_block = runner.kv_caches[0].shape[1] - 1
        self.scratch_row = runner.batch.scratch_row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.greedy_ids: dict[int, torch.Tensor] = {}  # last stage: [bucket] argmax of the logits
        self.num_replays = 0
        self.collectives: dict[int, tuple] = {}  # bucket -> what one replay communicates

    def can_run(self, host: HostStep) -> bool:
        ready = bool(self.graphs) or not self.use_capture
        return ready and host.is_decode_only and host.num_seqs <= self.max_size

    # -- capture -----------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        """Captures every bucket, largest first (the pool then fits them all)."""
        if not self.use_capture:
            self.warm_up(self.max_size)
            return
        torch.cuda.set_device(self.runner.device)  # the current device is per thread
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.sizes, reverse=True):
            self.warm_up(size)
            graph = torch.cuda.CUDAGraph()
            before = comm.TOTALS.snapshot()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size], self.greedy_ids[size] = self._body(size)
            self.collectives[size] = comm.TOTALS.since(before)  # recorded, not yet run
            comm.TOTALS.remove(self.collectives[size])
            self.graphs[size] = graph
            if progress is not None:
                progress(size)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def warm_up(self, size: int) -> None:
        """Runs the step of a bucket of padding rows eagerly: kernels compile (Triton JIT)
        outside any capture, and the step's memory peak shows."""
        self.runner.batch.block_table[self.scratch_row].fill_(self.scratch_block)
        if not self.use_capture:
            return
        torch.cuda.set_device(self.runner.device)
        padding = torch.from_numpy(self._padding(size).reshape(-1))
        self.static[:padding.numel()].copy_(padding)
        for _ in range(2):
            self._body(size)
        torch.cuda.synchronize()

    def _body(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decode step over static[: 5 · size]: ([size, vocab] logits, [size] their greedy
        ids, also stored as the rows' last sampled ids) on the last stage, ([size, hidden]
        residual stream, None) on the others."""
        runner, batch = self.runner, self.runner.batch
        ids, positions, slots, seq_lens, rows = self.static[:NUM_STATIC_FIELDS * size].view(
            NUM_STATIC_FIELDS, size)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=[1] * size, block_tables=batch.block_table.index_select(0, rows),
            block_size=batch.block_size, query_starts=list(range(size + 1)),
            seq_lens_tensor=seq_lens.to(torch.int32), max_query_len=1,
            backend=runner.attention_backend)
        ids = batch.resolve_last_sampled(ids) if runner.is_first_stage else None
        hidden_in = self.hidden_in[:size] if self.hidden_in is not None else None
        hidden = runner.forward(ids, positions, meta, hidden_in)
        if not runner.is_last_stage:
            return hidden, None
        logits = runner.model.compute_logits(hidden)
        greedy = argmax_ids(logits)  # [size]; padding rows write the scratch row
        batch.last_sampled.index_copy_(0, rows, greedy)
        return logits, greedy

    # -- replay ------------------------------------------------------------------------------

    def run(self, host: HostStep, hidden_in: torch.Tensor | None) -> ReplayedStep:
        """Replays the bucket of host's decode step. Its outputs are the graph's own memory,
        which the next replay overwrites."""
        size = self.sizes[bisect.bisect_left(self.sizes, host.num_seqs)]
        n = host.num_seqs
        fields = self._padding(size)
        fields[:, :n] = (host.input_ids, host.positions, host.slot_mapping, host.seq_lens,
                         host.rows)
        (static_part,), sampling = self.runner.batch.upload([fields.reshape(-1)], host)
        self.static[:fields.size].copy_(static_part)
        if hidden_in is not None:
            self.hidden_in[:n].copy_(hidden_in)
        if self.use_capture:
            self.graphs[size].replay()
            comm.TOTALS.add_all(self.collectives[size])
        else:
            self.outputs[size], self.greedy_ids[size] = self._body(size)
        self.num_replays += 1
        greedy = self.greedy_ids[size]
        return ReplayedStep(self.outputs[size][:n], None if greedy is None else greedy[:n],
                            *sampling)

    def _padding(self, size: int) -> np.ndarray:
        """[5, size]: every row a padding row (id 0, position 0, the scratch slot and row)."""
        fields = np.zeros((NUM_STATIC_FIELDS, size), dtype=np.int64)
        fields[2] = self.scratch_block * self.runner.block_size
        fields[3] = 1
        fields[4] = self.scratch_row
        return fields

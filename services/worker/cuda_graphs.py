"""CUDA graphs of the decode step: one per batch bucket, captured at worker start.

A decode step (one new token per sequence) of B sequences replays the graph of the smallest
bucket >= B; the rows past B are padding that writes its K/V into a scratch block no sequence
owns and whose outputs are ignored. A graph reads its inputs from one static device buffer,

    static int64 = | input ids | positions | slots | seq lens | rows |
                     (T each: T = B tokens)    (B each)

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

With speculative decoding (`verify_len` Q = 1 + K proposals) a second set of graphs runs the
verification steps: every sequence's last sampled token and its proposals, at most Q tokens each,
all of them logits rows. A sequence's window is padded to Q tokens (padding tokens write into the
scratch block, and come after its real ones, so no real token attends to them), so the step of B
sequences is one of B x Q tokens whose shape the graph fixes; the attention is the prefill kernel
over Q queries per sequence. Its outputs are gathered back to the real tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from services.model import comm
from services.model.attention import AttentionMetadata
from services.worker.input_batch import HostStep

MAX_VERIFY_TOKENS = 512  # verification buckets hold at most this many tokens (B x Q)


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


def verify_bucket_sizes(sizes: tuple[int, ...], verify_len: int) -> tuple[int, ...]:
    """The buckets that get a verification graph of verify_len tokens per sequence: those of at
    most MAX_VERIFY_TOKENS tokens (none when verify_len is 1)."""
    if verify_len <= 1:
        return ()
    return tuple(s for s in sorted(sizes) if s * verify_len <= MAX_VERIFY_TOKENS)


class DecodeGraphs:
    """capture=False runs each bucket's body eagerly on the same static buffers, padding and
    scratch rows included: what the CPU tests check of this path."""

    def __init__(self, runner, sizes: tuple[int, ...], capture: bool = True,
                 verify_len: int = 1):
        self.runner = runner
        self.use_capture = capture
        self.sizes = tuple(sorted(sizes))
        self.max_size = self.sizes[-1]
        self.verify_len = verify_len  # Q of the verification graphs; 1 = none
        self.verify_sizes = verify_bucket_sizes(self.sizes, verify_len)
        self.keys = [(s, 1) for s in self.sizes] + [(s, verify_len) for s in self.verify_sizes]
        max_tokens = max(size * q for size, q in self.keys)
        device = runner.device
        # static: | ids | positions | slots | (T = B x Q each) | seq lens | rows | (B each)
        self.static = torch.zeros(3 * max_tokens + 2 * self.max_size, dtype=torch.long,
                                  device=device)
        self.hidden_in = None
        if not runner.is_first_stage:
            hidden = runner.model.config.hidden_size
            self.hidden_in = torch.zeros(max_tokens, hidden, dtype=runner.kv_caches[0].dtype,
                                         device=device)
        self.query_start_loc = {q: torch.arange(0, q * self.max_size + 1, q, dtype=torch.int32,
                                                device=device) for q in {1, verify_len}}
        # Padding rows write into the scratch block (the last block of every cache) and read
        # the scratch row of the block table (its last row), which points there.
        self.scratch_block = runner.kv_caches[0].shape[1] - 1
        self.scratch_row = runner.batch.scratch_row
        # by (bucket, tokens per sequence):
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.greedy_ids: dict[tuple[int, int], torch.Tensor] = {}  # last stage: argmax of logits
        self.num_replays = 0
        self.num_verify_replays = 0
        self.collectives: dict[tuple[int, int], tuple] = {}  # what one replay communicates

    def key_for(self, host: HostStep) -> tuple[int, int] | None:
        """The (bucket, tokens per sequence) graph of host's step, or None: it runs eagerly."""
        if self.use_capture and not self.graphs:
            return None
        n = host.num_seqs
        if host.is_decode_only and n <= self.max_size:
            return self.sizes[bisect.bisect_left(self.sizes, n)], 1
        if (self.verify_sizes and n <= self.verify_sizes[-1] and host.all_rows_sampled
                and int(np.diff(host.query_start_loc).max()) <= self.verify_len):
            return self.verify_sizes[bisect.bisect_left(self.verify_sizes, n)], self.verify_len
        return None

    # -- capture -----------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        """Captures every bucket, largest first (the pool then fits them all)."""
        if not self.use_capture:
            self.warm_up(self.max_size)
            return
        torch.cuda.set_device(self.runner.device)  # the current device is per thread
        pool = torch.cuda.graph_pool_handle()
        for key in sorted(self.keys, key=lambda k: (k[0] * k[1], k), reverse=True):
            self.warm_up(*key)
            graph = torch.cuda.CUDAGraph()
            before = comm.TOTALS.snapshot()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key], self.greedy_ids[key] = self._body(*key)
            self.collectives[key] = comm.TOTALS.since(before)  # recorded, not yet run
            comm.TOTALS.remove(self.collectives[key])
            self.graphs[key] = graph
            if progress is not None:
                progress(key)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def warm_up(self, size: int, q: int = 1) -> None:
        """Runs the step of a bucket of padding rows eagerly: kernels compile (Triton JIT)
        outside any capture, and the step's memory peak shows."""
        self.runner.batch.block_table[self.scratch_row].fill_(self.scratch_block)
        if not self.use_capture:
            return
        torch.cuda.set_device(self.runner.device)
        padding = torch.from_numpy(self._padding(size, q))
        self.static[:padding.numel()].copy_(padding)
        for _ in range(2):
            self._body(size, q)
        torch.cuda.synchronize()

    def _body(self, size: int, q: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step of size sequences of q tokens each over the static buffer: ([size · q,
        vocab] logits, [size · q] their greedy ids) on the last stage, ([size · q, hidden]
        residual stream, None) on the others. A decode step (q = 1) also stores the greedy ids
        as the rows' last sampled ids."""
        runner, batch = self.runner, self.runner.batch
        tokens = size * q
        ids, positions, slots = self.static[:3 * tokens].view(3, tokens)
        seq_lens, rows = self.static[3 * tokens:3 * tokens + 2 * size].view(2, size)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=self.query_start_loc[q][:size + 1],
            seq_lens=[q] * size, block_tables=batch.block_table.index_select(0, rows),
            block_size=batch.block_size, query_starts=list(range(0, tokens + 1, q)),
            seq_lens_tensor=seq_lens.to(torch.int32), max_query_len=q,
            backend=runner.attention_backend)
        ids = batch.resolve_last_sampled(ids) if runner.is_first_stage else None
        hidden_in = self.hidden_in[:tokens] if self.hidden_in is not None else None
        hidden = runner.forward(ids, positions, meta, hidden_in)
        if not runner.is_last_stage:
            return hidden, None
        logits, greedy = runner.model.compute_logits_and_greedy(hidden)
        if q == 1:  # a verifying sequence's next input comes from the host
            batch.last_sampled.index_copy_(0, rows, greedy)
        return logits, greedy

    # -- replay ------------------------------------------------------------------------------

    def run(self, host: HostStep, hidden_in: torch.Tensor | None,
            key: tuple[int, int]) -> ReplayedStep:
        """Replays graph key (key_for(host)) with host's step. Its outputs are the graph's own
        memory, which the next replay overwrites (a verification step's are gathered into new
        memory)."""
        size, q = key
        n, tokens = host.num_seqs, size * q
        fields = self._padding(size, q)
        per_token = fields[:3 * tokens].reshape(3, tokens)  # views: they fill fields
        per_seq = fields[3 * tokens:].reshape(2, size)
        if q == 1:  # a decode: token i is sequence i's
            padded, seq_lens = None, host.seq_lens
            per_token[:, :n] = (host.input_ids, host.positions, host.slot_mapping)
        else:  # each sequence's tokens at the start of its window of q
            lens = np.diff(host.query_start_loc)
            seq_of_token = np.repeat(np.arange(n), lens)
            padded = seq_of_token * q + (np.arange(host.num_tokens)
                                         - host.query_start_loc[seq_of_token])
            per_token[:, padded] = (host.input_ids, host.positions, host.slot_mapping)
            # The attention reads a sequence's queries as the last q of seq_len positions.
            seq_lens = host.seq_lens - lens + q
        per_seq[:, :n] = (seq_lens, host.rows)
        parts = [fields] if padded is None else [fields, padded]
        (static_part, *gather), sampling = self.runner.batch.upload(parts, host)
        self.static[:fields.size].copy_(static_part)
        if hidden_in is not None:
            if padded is None:
                self.hidden_in[:n].copy_(hidden_in)
            else:
                self.hidden_in.index_copy_(0, gather[0], hidden_in)
        if self.use_capture:
            self.graphs[key].replay()
            comm.TOTALS.add_all(self.collectives[key])
        else:
            self.outputs[key], self.greedy_ids[key] = self._body(size, q)
        self.num_replays += 1
        outputs, greedy = self.outputs[key], self.greedy_ids[key]
        if padded is None:
            outputs, greedy = outputs[:n], None if greedy is None else greedy[:n]
        else:
            self.num_verify_replays += 1
            outputs = outputs.index_select(0, gather[0])
            greedy = None if greedy is None else greedy.index_select(0, gather[0])
        return ReplayedStep(outputs, greedy, *sampling)

    def _padding(self, size: int, q: int = 1) -> np.ndarray:
        """The static fields of a bucket of size sequences x q tokens, every one padding: ids and
        positions 0, the scratch slot; sequence lengths q, the scratch row."""
        tokens = size * q
        fields = np.zeros(3 * tokens + 2 * size, dtype=np.int64)
        fields[2 * tokens:3 * tokens] = self.scratch_block * self.runner.block_size
        fields[3 * tokens:3 * tokens + size] = q
        fields[3 * tokens + size:] = self.scratch_row
        return fields

"""Turns a step plan into tensors, runs this worker's slab of the model, samples.

Runs on the worker's model thread (blocking collectives live here, never on the event loop).
The batch is flattened sequence after sequence (positions and slots: InputBatch.prepare):

    tokens     | s0 t0 t1 t2 | s1 t7 | s2 t3 t4 |      (prefill chunks and decodes mixed)
    query_start  0           3       4          6

A step is launched, not waited for: `launch` queues the step's work on the device and returns a
`PendingStep` whose ids reach the host through a non-blocking copy; the worker launches the
next plan (whose decode inputs are the device tensor of these ids) before it waits. Decode
steps replay a CUDA graph of their batch bucket where graphs are captured (cuda_graphs.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from services.model import ParallelContext, tp_all_gather
from services.model.attention import to_device
from services.model.sampler import argmax_ids, sample_batch, to_int64
from services.step import StepPlan
from services.worker.cuda_graphs import DecodeGraphs
from services.worker.input_batch import HostStep, InputBatch


@dataclass
class PendingStep:
    """A launched step. Last stage: ids on their way to the host; other stages: the residual
    stream for the next stage (already a device tensor)."""

    seq_ids: list[int]
    started: float
    ids_host: torch.Tensor | None = None  # [num_sampled] long, pinned on GPUs
    done: torch.cuda.Event | None = None
    hidden: torch.Tensor | None = None
    graph_replay: bool = False  # it replayed a CUDA graph (else it ran eagerly)

    # the proposals of each sampled sequence, in seq_ids' order; () = none anywhere
    drafts: tuple[tuple[int, ...], ...] = ()

    def token_ids(self) -> list[int]:
        """The ids sampled, one per logits row (K + 1 for a sequence with K proposals)."""
        if self.done is not None:
            self.done.synchronize()
        return [] if self.ids_host is None else self.ids_host.tolist()

    def results(self) -> tuple[list[int], tuple[int, ...]]:
        """(the ids each sampled sequence gets, flattened; how many each, or () for one each).
        A sequence with proposals d_1..d_K sampled g_0..g_K at their positions: it gets g_0..g_a,
        a the number of leading proposals equal to the target's tokens (d_i = g_(i-1)) -- with
        greedy sampling exactly the target's own next a + 1 tokens."""
        ids = self.token_ids()
        if not any(self.drafts):
            return ids, ()
        out, counts, pos = [], [], 0
        for drafts in self.drafts:
            sampled = ids[pos:pos + len(drafts) + 1]
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == sampled[accepted]:
                accepted += 1
            out += sampled[:accepted + 1]
            counts.append(accepted + 1)
            pos += len(drafts) + 1
        return out, tuple(counts)

    @property
    def on_host(self) -> bool:
        """Whether token_ids() returns at once: nothing left to wait for (a CPU step)."""
        return self.done is None

    def elapsed_us(self) -> int:
        return int((time.perf_counter() - self.started) * 1e6)


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, ctx: ParallelContext, *, max_num_seqs: int = 256,
                 max_model_len: int = 4096, attention_backend: str = "torch",
                 cuda_graph_sizes: tuple[int, ...] = (), capture_graphs: bool = True,
                 verify_len: int = 1):
        self.model = model
        self.ctx = ctx
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.attention_backend = attention_backend
        self.is_first_stage, self.is_last_stage = ctx.is_first_stage, ctx.is_last_stage
        max_blocks = -(-max_model_len // block_size)
        self.batch = InputBatch(max_num_seqs, max_blocks, block_size, device)
        # verify_len: 1 + the proposals a speculating sequence verifies per step (graphs for them)
        self.graphs = (DecodeGraphs(self, cuda_graph_sizes, capture_graphs, verify_len)
                       if cuda_graph_sizes else None)

    def reset(self) -> None:
        """A new scheduler: nothing of the last one's sequences holds."""
        self.batch.clear()

    def capture_graphs(self, progress=None) -> None:
        if self.graphs is not None:
            self.graphs.capture(progress)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, hidden_in: torch.Tensor | None = None) -> PendingStep:
        started = time.perf_counter()
        host = self.batch.prepare(plan)
        pending = PendingStep(plan.sampled_seq_ids, started,
                              drafts=tuple(s.draft_token_ids for s in plan.seqs if s.sample))
        if not plan.seqs:
            pending.hidden = hidden_in
            return pending
        if hidden_in is not None and self.ctx.tp_size > 1:
            # The previous stage sent each rank its column slice: [num_tokens, hidden / T].
            hidden_in = tp_all_gather(hidden_in, self.ctx, dim=-1)  # [num_tokens, hidden]
        greedy = None  # the step's greedy ids, already the rows' last sampled ids
        graph = self.graphs.key_for(host) if self.graphs is not None else None
        if graph is not None:
            replayed = self.graphs.run(host, hidden_in, graph)
            pending.graph_replay = True
            if not self.is_last_stage:  # the stage link sends it after the next replay began
                pending.hidden = replayed.outputs.clone()
                return pending
            if not len(host.sampled_rows):
                return pending
            sampled_rows = replayed.sampled_rows
            if host.all_rows_sampled:
                logits, greedy = replayed.outputs, replayed.greedy_ids
            else:
                logits = replayed.outputs[replayed.logits_indices]
        else:
            step = self.batch.to_device(host, self.attention_backend)
            hidden = self.forward(step.input_ids, step.positions, step.attn, hidden_in)
            if not self.is_last_stage or not len(host.sampled_rows):
                pending.hidden = hidden
                return pending
            logits = self.model.compute_logits(hidden[step.logits_indices])
            sampled_rows = step.sampled_rows
        self._sample(logits, host, sampled_rows, pending, greedy)
        return pending

    def forward(self, ids, positions, meta, hidden_in) -> torch.Tensor:
        """[num_tokens, hidden]: the residual stream (or its final norm on the last stage)."""
        return self.model(positions, meta, self.kv_caches,
                          input_ids=ids if self.is_first_stage else None,
                          hidden_states=hidden_in)

    def _sample(self, logits: torch.Tensor, host: HostStep, sampled_rows: torch.Tensor,
                pending: PendingStep, greedy: torch.Tensor | None = None) -> None:
        """logits [num_sampled, vocab] -> ids on the device (kept per row for the next decode),
        and on their way to the host. greedy: the rows' argmax where a graph took it and kept
        it as their last sampled ids."""
        held = self.batch.held_at(host.sampled_rows)
        if all(h.sampling.is_greedy for h in held):
            if greedy is not None:
                tokens = greedy  # nothing to launch: the graph stored them too
            else:
                tokens = argmax_ids(logits)  # [num_sampled]
                self.batch.last_sampled.index_copy_(0, sampled_rows, tokens)
        else:
            tokens = sample_batch(logits, *self._sampling_tensors(held, host), all_greedy=False)
            self.batch.last_sampled.index_copy_(0, sampled_rows, tokens)
        if self.device.type == "cuda":
            pending.ids_host = torch.empty(tokens.shape, dtype=torch.long, pin_memory=True)
            pending.ids_host.copy_(tokens, non_blocking=True)
            pending.done = torch.cuda.Event()
            pending.done.record()
        else:
            pending.ids_host = tokens

    def _sampling_tensors(self, held, host: HostStep):
        """(temperature, top_p, top_k, seeds, positions) [num_sampled] each, on the device.
        The position mixed into a draw is the index of the token it draws: one past the input
        token of its logits row (a sequence verifying K proposals draws at K + 1 positions)."""
        positions = host.positions[host.logits_indices] + 1
        floats = to_device(torch.tensor([[h.sampling.temperature for h in held],
                                         [h.sampling.top_p for h in held]]), self.device)
        ints = to_device(torch.tensor([[h.sampling.top_k for h in held],
                                       [to_int64(h.seed) for h in held], positions.tolist()]),
                         self.device)
        return floats[0], floats[1], ints[0], ints[1], ints[2]


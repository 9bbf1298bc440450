"""Turns a step plan into tensors, runs this worker's slab of the model, samples.

Runs on the worker's model thread (blocking collectives live here, never on the event loop).
The batch is flattened sequence after sequence (positions and slots: build_attention_metadata):

    tokens     | s0 t0 t1 t2 | s1 t7 | s2 t3 t4 |      (prefill chunks and decodes mixed)
    query_start  0           3       4          6
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.model import (AttentionMetadata, ParallelContext, build_attention_metadata, sample,
                            tp_all_gather)
from services.model.attention import to_device
from services.worker.plan import StepPlan


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] (first stage only)
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled] row of each sampled sequence's last token


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, is_first_stage: bool, is_last_stage: bool,
                 ctx: ParallelContext):
        self.model = model
        self.ctx = ctx
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.is_first_stage = is_first_stage
        self.is_last_stage = is_last_stage
        # The token each sequence sampled last, so a decode can be planned before the
        # scheduler has seen it (ScheduledSeq.append_last_sampled).
        self.last_sampled: dict[int, int] = {}

    def forget(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.last_sampled.pop(seq_id, None)

    def prepare(self, plan: StepPlan) -> StepInputs:
        token_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for seq in plan.seqs:
            token_ids += seq.token_ids
            if seq.append_last_sampled:
                token_ids.append(self.last_sampled[seq.seq_id])
            query_lens.append(seq.num_new_tokens)
            seq_lens.append(seq.num_computed_tokens + seq.num_new_tokens)
            if seq.sample:
                sample_rows.append(len(token_ids) - 1)
        positions, attn = build_attention_metadata(
            query_lens, seq_lens, [s.block_table for s in plan.seqs], self.block_size, self.device)
        ids_and_rows = to_device(torch.tensor(token_ids + sample_rows, dtype=torch.long),
                                 self.device)
        input_ids, rows = ids_and_rows.split([len(token_ids), len(sample_rows)])
        return StepInputs(input_ids, positions, attn, rows)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, hidden_in: torch.Tensor | None = None):
        """Runs the step: the residual stream for the next stage, or the sampled ids."""
        self.forget(plan.finished_seq_ids)
        if not plan.seqs:
            return [] if self.is_last_stage else hidden_in
        inputs = self.prepare(plan)
        if hidden_in is not None and self.ctx.tp_size > 1:
            # The previous stage sent each rank its column slice: [num_tokens, hidden / T].
            hidden_in = tp_all_gather(hidden_in, self.ctx, dim=-1)  # [num_tokens, hidden]
        hidden = self.model(inputs.positions, inputs.attn, self.kv_caches,
                            input_ids=inputs.input_ids if self.is_first_stage else None,
                            hidden_states=hidden_in)
        if not self.is_last_stage:
            return hidden
        return self._sample(plan, inputs, hidden)

    def _sample(self, plan: StepPlan, inputs: StepInputs, hidden: torch.Tensor) -> list[int]:
        sampled = [s for s in plan.seqs if s.sample]
        if not sampled:
            return []
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [num_sampled, vocab]
        positions = [s.num_computed_tokens + s.num_new_tokens for s in sampled]
        tokens = sample(logits, [s.sampling for s in sampled], positions)
        for seq, token in zip(sampled, tokens):
            self.last_sampled[seq.seq_id] = token
        return tokens

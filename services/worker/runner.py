"""Turns a step plan into tensors, runs this worker's slab of the model, samples.

Runs on the worker's model thread (blocking collectives live here, never on the event loop).
The batch is flattened sequence after sequence:

    tokens     | s0 t0 t1 t2 | s1 t7 | s2 t3 t4 |      (prefill chunks and decodes mixed)
    query_start  0           3       4          6
    slot       = block_table[pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.model import AttentionMetadata, ParallelContext, sample, tp_all_gather
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
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for seq in plan.seqs:
            ids = list(seq.token_ids)
            if seq.append_last_sampled:
                ids.append(self.last_sampled[seq.seq_id])
            start = seq.num_computed_tokens
            end = start + len(ids)
            table = seq.block_table
            token_ids += ids
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + len(ids))
            seq_lens.append(end)
            if seq.sample:
                sample_rows.append(query_start[-1] - 1)
        width = max(len(s.block_table) for s in plan.seqs)
        tables = [x for s in plan.seqs for x in (*s.block_table, *[0] * (width - len(s.block_table)))]
        # Everything in one host buffer, one copy to the device.
        parts = (token_ids, positions, slots, query_start, seq_lens, sample_rows, tables)
        host = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(self.device, non_blocking=True)
        input_ids, pos, slot, qsl, lens, rows, table = flat.split([len(x) for x in parts])
        attn = AttentionMetadata(slot_mapping=slot, query_start_loc=qsl, seq_lens=seq_lens,
                                 block_tables=table.view(len(plan.seqs), width), block_size=bs,
                                 query_starts=query_start, seq_lens_tensor=lens)
        return StepInputs(input_ids, pos, attn, rows)

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

"""A minimal step driver over our model, the way a worker uses it: paged KV blocks, one flat batch
per step, pipeline stages run one after the other in this process.

Blocks are handed out from a fixed random permutation, so a sequence's blocks are neither
contiguous nor in order and no two sequences share one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from services.model.attention import allocate_kv_caches, build_attention_metadata
from services.model.llama import LlamaForCausalLM
from services.model.sampler import SamplingOptions, sample

BLOCK_SIZE = 16
MAX_BLOCKS_PER_SEQ = 8  # 128 positions per sequence
MAX_SEQS = 8


class PagedRunner:
    def __init__(self, stages: Sequence[LlamaForCausalLM], block_size: int = BLOCK_SIZE):
        self.stages = list(stages)
        self.block_size = block_size
        num_blocks = MAX_BLOCKS_PER_SEQ * MAX_SEQS
        self.kv_caches = [
            allocate_kv_caches(s.config, s.ctx, len(s.layer_range), num_blocks, block_size, torch.float32, "cpu")
            for s in self.stages
        ]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.block_tables: dict[str, list[int]] = {}
        self.seq_lens: dict[str, int] = {}

    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Runs the new tokens of every sequence in one flat batch; logits [len(chunk), V] per seq."""
        for seq_id in chunks:
            self._reserve(seq_id)
        query_lens = [len(tokens) for tokens in chunks.values()]
        seq_lens = [self.seq_lens[s] + len(tokens) for s, tokens in chunks.items()]
        tables = [self._table(s, n) for s, n in zip(chunks, seq_lens)]
        positions, meta = build_attention_metadata(query_lens, seq_lens, tables, self.block_size)
        input_ids = torch.tensor([t for tokens in chunks.values() for t in tokens])
        logits = self.forward(positions, meta, input_ids)
        for seq_id, seq_len in zip(chunks, seq_lens):
            self.seq_lens[seq_id] = seq_len
        return dict(zip(chunks, logits.split(query_lens)))

    def forward(self, positions, meta, input_ids) -> torch.Tensor:
        hidden = None
        for stage, caches in zip(self.stages, self.kv_caches):
            if stage.ctx.is_first_stage:
                hidden = stage(positions, meta, caches, input_ids=input_ids)
            else:
                hidden = stage(positions, meta, caches, hidden_states=hidden)
        return self.stages[-1].compute_logits(hidden)  # [num_tokens, V]

    def generate(self, prompts: dict[str, list[int]], num_new: int) -> tuple[dict[str, list[int]], dict]:
        """Greedy: one step prefills every prompt, then num_new - 1 batched decode steps.

        Returns per sequence its new tokens and the logits of every token it fed,
        [len(prompt) + num_new - 1, V] (row j predicts token j + 1).
        """
        all_logits = {s: [lg] for s, lg in self.step(prompts).items()}
        new_tokens = {s: [t] for s, t in zip(prompts, self._greedy({s: lg[0] for s, lg in all_logits.items()}))}
        for _ in range(num_new - 1):
            logits = self.step({s: tokens[-1:] for s, tokens in new_tokens.items()})
            for seq_id, token in zip(new_tokens, self._greedy(logits)):
                new_tokens[seq_id].append(token)
                all_logits[seq_id].append(logits[seq_id])
        return new_tokens, {s: torch.cat(lg) for s, lg in all_logits.items()}

    def _greedy(self, step_logits: dict[str, torch.Tensor]) -> list[int]:
        rows = torch.stack([logits[-1] for logits in step_logits.values()])  # [num_seqs, V]
        positions = [self.seq_lens[s] for s in step_logits]
        return sample(rows, [SamplingOptions()] * rows.shape[0], positions)

    def _reserve(self, seq_id: str) -> None:
        if seq_id not in self.block_tables:
            self.block_tables[seq_id] = []
            self.seq_lens[seq_id] = 0

    def _table(self, seq_id: str, seq_len: int) -> list[int]:
        table = self.block_tables[seq_id]
        while len(table) < math.ceil(seq_len / self.block_size):
            table.append(self.free_blocks.pop())
        return table


def hf_greedy(hf_model, prompt: list[int], num_new: int) -> list[int]:
    """transformers' own greedy generate, never stopping at EOS."""
    hf_model.generation_config.eos_token_id = None
    x = torch.tensor([prompt])
    out = hf_model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=num_new, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()  # [len, V]

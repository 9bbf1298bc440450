"""Speculative decoding with a draft model, the workers' half (method draft_model).

The sampling worker (the last stage's TP rank 0) runs a small model beside the target: after
every step, once the step's tokens are on the host, it proposes each sampled sequence's next K
tokens and sends them back with the step's result; the scheduler puts them in that sequence's
next plan, and the target verifies them as it verifies n-gram proposals (services/scheduler/
speculative.py). The draft runs here rather than as a stage of its own because it needs every
token the moment it is sampled, which is here, and a stage of its own would add a network hop
to every step; the other ranks never see it (it is small: one device holds it whole).

The draft proposes its greedy tokens: a point mass, so verification keeps the target's tokens
exactly as for n-gram (greedy output unchanged, a seeded draw a pure function of seed and
position, the same with speculation on or off).

The draft has a model runner of its own, with its own KV cache and its own blocks (allocated
here, from a pool the size of the target's), driven by plans this module writes: one that
catches the draft's KV up with the sequence's new tokens and samples the first proposal, then
K - 1 decodes whose inputs are the proposals before, resolved on the device (no host round trip
between them). Per step the work is K draft steps over the batch, whatever the context length.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from services.step import ScheduledSeq, SeqStart, SamplingOptions, StepPlan
from services.worker.runner import ModelRunner

GREEDY = SamplingOptions()


@dataclass
class _DraftSeq:
    tokens: list[int]  # every token of the sequence known here: its start tokens, then results
    computed: int = 0  # positions [0, computed) hold valid draft KV
    blocks: list[int] = field(default_factory=list)  # the draft cache's blocks, in order
    new_blocks: list[int] = field(default_factory=list)  # reserved for the coming draft steps
    started: bool = False  # the draft runner holds it
    proposed_at: int = 0  # the position of the first of the proposals last made
    proposed: tuple[int, ...] = ()


class DraftProposer:
    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int,
                 num_speculative_tokens: int, max_model_len: int):
        self.runner = runner
        self.k = num_speculative_tokens
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self.seqs: dict[int, _DraftSeq] = {}
        self._step_ids = itertools.count()

    def reset(self) -> None:
        """A new scheduler: nothing of the last one's sequences holds."""
        self.seqs.clear()
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.runner.reset()

    def propose(self, plan: StepPlan, got: dict[int, list[int]]) -> tuple[list[int], list[int]]:
        """After the target's step: (proposals flattened, how many each; [] = none) for plan's
        sampled sequences in plan order, from the tokens each got (StepResult.tokens_by_seq)."""
        self._drop(plan.dropped_seq_ids)
        for item in plan.seqs:
            if item.start is not None:  # (again, after a preemption): what it knows now
                self._drop([item.seq_id])
                self.seqs[item.seq_id] = _DraftSeq(list(item.start.token_ids))
        order = [s for s in plan.sampled_seq_ids if s in self.seqs]
        for seq_id in order:
            self._take(self.seqs[seq_id], got[seq_id])
        proposing = [s for s in order if self._reserve(self.seqs[s])]
        proposals = self._run(proposing) if proposing else {}
        flat, num = [], []
        for seq_id in plan.sampled_seq_ids:
            mine = proposals.get(seq_id, ())
            flat += mine
            num.append(len(mine))
        return flat, num if any(num) else []

    # -- one sequence's bookkeeping -------------------------------------------------------

    def _take(self, seq: _DraftSeq, new_tokens: list[int]) -> None:
        """The step's tokens appended; the draft KV stays valid up to the last proposal that
        was kept (the proposals' KV was written at their positions), and the last token is
        always fed again (the first draft step needs an input; the step may have verified fewer
        proposals than were made, all of them kept)."""
        if seq.proposed:
            kept = 0
            while kept < min(len(seq.proposed), len(new_tokens)) and \
                    seq.proposed[kept] == new_tokens[kept]:
                kept += 1
            seq.computed = min(seq.computed, seq.proposed_at + kept)
        seq.tokens += new_tokens
        seq.computed = min(seq.computed, len(seq.tokens) - 1)
        seq.proposed = ()

    def _reserve(self, seq: _DraftSeq) -> bool:
        """Blocks for the draft's positions up to the last proposal's input; False (no
        proposals this time) when the pool or --max-model-len has no room."""
        end = len(seq.tokens) + self.k - 1  # positions written: the new tokens, K - 1 proposals
        if end > self.max_model_len:
            return False
        need = -(-end // self.block_size) - len(seq.blocks)
        if need > len(self._free):
            return False
        seq.new_blocks = [self._free.pop() for _ in range(max(0, need))]
        return True

    def _drop(self, seq_ids) -> None:
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self._free += seq.blocks + seq.new_blocks
        self.runner.batch.drop(seq_ids)

    # -- the draft's steps ------------------------------------------------------------------

    def _run(self, seq_ids: list[int]) -> dict[int, tuple[int, ...]]:
        """K draft steps over seq_ids: the first catches up and samples proposal 1, each next
        one decodes the proposal before; returns each sequence's K proposals."""
        first = []
        for seq_id in seq_ids:
            seq = self.seqs[seq_id]
            length = len(seq.tokens)
            first.append(ScheduledSeq(
                seq_id, seq.computed, length - seq.computed, tuple(seq.new_blocks),
                tuple(seq.tokens[seq.computed:]), sample=True,
                start=None if seq.started else SeqStart((), GREEDY)))
            seq.blocks += seq.new_blocks
            seq.new_blocks, seq.started = [], True
        launched = [self.runner.launch(StepPlan(next(self._step_ids), tuple(first)))]
        for j in range(1, self.k):
            step = tuple(ScheduledSeq(s, len(self.seqs[s].tokens) + j - 1, 1,
                                      append_last_sampled=True, sample=True) for s in seq_ids)
            launched.append(self.runner.launch(StepPlan(next(self._step_ids), step)))
        ids = [pending.token_ids() for pending in launched]  # [K][len(seq_ids)]
        out = {}
        for i, seq_id in enumerate(seq_ids):
            seq = self.seqs[seq_id]
            seq.proposed = tuple(ids[j][i] for j in range(self.k))
            seq.proposed_at = len(seq.tokens)
            seq.computed = len(seq.tokens) + self.k - 1
            out[seq_id] = seq.proposed
        return out

"""Continuous batching: which sequences run in the next step, and with how many tokens.

One rule for prefill and decode (a sequence's computed tokens catch up with its tokens):
each step takes the running sequences first (decodes and unfinished prompt chunks, oldest
first), then admits waiting ones, all under a per-step token budget. A long prompt is thus
prefilled in chunks while the others keep decoding. When KV blocks run out, the newest
running sequence is preempted: its blocks are freed and it is recomputed later from its
prompt and the tokens it already produced, so its output does not change.

Pure logic: no I/O, no torch. The engine (engine.py) drives it from the event loop.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from services.scheduler.block_manager import BlockManager
from services.scheduler.sequence import FinishReason, Sequence
from services.scheduler.speculative import NgramIndex, SpeculativeConfig
from services.step import ScheduledSeq, SeqStart, StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunk size)
    enable_chunked_prefill: bool = True
    # The workers keep each sequence's last sampled token, so a decode can be planned before
    # that token reaches the scheduler (PP = 1). With PP > 1 stage 0 cannot see the last
    # stage's sample: a sequence then waits for its result before its next step.
    workers_keep_last_token: bool = True
    eos_token_ids: tuple[int, ...] = ()
    # With PP = P, P micro-batches of disjoint sequences are in flight: each plan takes about
    # 1/P of the sequences, so every stage has work.
    num_micro_batches: int = 1
    # Sequences the workers hold at once (rows of their persistent batch); 0 = no limit.
    max_live_seqs: int = 0
    # Speculative decoding (speculative.py); None = off. Greedy requests only, for now.
    speculative: SpeculativeConfig | None = None


class SeqUpdate(NamedTuple):
    """What one result did to a sequence: new tokens and, when it ended, why (one per
    sequence per step: a named tuple is the cheapest record to build)."""

    seq: Sequence
    new_token_ids: list[int]
    finished: FinishReason | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._step_ids = itertools.count()
        self._finished_to_announce: list[int] = []
        self._preempted_to_announce: list[int] = []
        self.num_preemptions = 0
        self.max_batch_size_seen = 0
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_prompt_tokens = 0  # prompts of sequences that got their first token
        self.num_generation_tokens = 0
        self.num_drafts = 0  # steps of a sequence that carried proposals
        self.num_draft_tokens = 0  # proposals sent
        self.num_accepted_tokens = 0  # proposals the target's tokens matched
        # of those, how many were the i-th proposal of their step (vLLM's accepted per position)
        self.num_accepted_per_pos = [0] * (config.speculative.num_speculative_tokens
                                           if config.speculative else 0)
        # method draft_model: proposals come with the results (else the scheduler makes them)
        self._drafts_from_results = bool(config.speculative
                                         and config.speculative.method == "draft_model")

    # -- requests in and out ---------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancels a sequence; its blocks return once no step in flight still uses them."""
        seq = self.seqs.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, FinishReason.CANCELLED)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(self._can_run(s) for s in self.running)

    # -- planning ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step, or None when nothing can run now."""
        budget = self.config.max_num_batched_tokens
        max_seqs = self._max_seqs_per_plan()
        planned: list[tuple[Sequence, int, tuple[int, ...]]] = []  # (seq, new tokens, drafts)
        index = 0  # preemption removes sequences behind this point only
        while index < len(self.running) and budget and len(planned) < max_seqs:
            seq = self.running[index]
            num_new = min(self._num_runnable_tokens(seq), budget)
            drafts = self._propose(seq, budget - 1) if num_new == 1 else ()
            if drafts and not self.blocks.allocate(seq.seq_id,
                                                   seq.num_computed_tokens + 1 + len(drafts)):
                drafts = ()  # proposals take free blocks only, never another's by preemption
            if num_new and self._reserve(seq, num_new + len(drafts)):
                planned.append((seq, num_new + len(drafts), drafts))
                budget -= num_new + len(drafts)
            index += 1
        self._admit(planned, budget, max_seqs)
        if not planned:
            return None
        self.max_batch_size_seen = max(self.max_batch_size_seen, len(planned))
        finished, self._finished_to_announce = tuple(self._finished_to_announce), []
        preempted, self._preempted_to_announce = tuple(self._preempted_to_announce), []
        return StepPlan(next(self._step_ids),
                        tuple(self._plan_seq(s, n, d) for s, n, d in planned),
                        finished_seq_ids=finished, preempted_seq_ids=preempted)

    def _speculates(self, seq: Sequence) -> bool:
        """Whether seq proposes tokens now: speculation is on and no more sequences run than
        the speculative config's disable_by_batch_size (then it plans ahead as others)."""
        spec = self.config.speculative
        return (spec is not None
                and not (spec.disable_by_batch_size
                         and len(self.running) > spec.disable_by_batch_size))

    def _propose(self, seq: Sequence, room: int) -> tuple[int, ...]:
        """Proposals to verify with seq's decode of its known last token: at most K, the
        step's room, and what max_tokens leaves after the token this step samples anyway."""
        if not self._speculates(seq) or seq.num_known_tokens - seq.num_computed_tokens != 1:
            return ()
        spec = self.config.speculative
        k = min(spec.num_speculative_tokens, room,
                seq.params.max_tokens - len(seq.output_ids) - 1)
        if spec.method == "draft_model":  # made by the sampling worker after the last step
            return seq.draft_proposals[:max(0, k)]
        if seq.ngram is None:
            seq.ngram = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max)
        return seq.ngram.propose(seq.token_view(seq.num_known_tokens), k)

    def _max_seqs_per_plan(self) -> int:
        num_seqs = len(self.running) + len(self.waiting)
        share = -(-num_seqs // self.config.num_micro_batches)  # ceil
        return max(1, min(self.config.max_num_seqs, share))

    def _can_run(self, seq: Sequence) -> bool:
        return self._num_runnable_tokens(seq) > 0

    def _num_runnable_tokens(self, seq: Sequence) -> int:
        """Tokens of seq the workers could compute now (0 if it must wait)."""
        if seq.finish_reason is not None or seq.preempt_pending:
            return 0
        if seq.num_inflight_steps and (not self.config.workers_keep_last_token
                                       or seq.verifying or self._speculates(seq)):
            return 0  # its next input is the result's last token (a speculating one: how many)
        known_left = len(seq.prompt_ids) + len(seq.output_ids) - seq.num_computed_tokens
        if known_left > 0:
            return known_left
        # Everything known is computed: the next input is the token the latest step in flight
        # samples (the workers resolve it on the device, in step order, however many are ahead).
        if seq.num_inflight_samples and seq.wants_more_samples:
            return 1
        return 0

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        """Blocks for seq's next num_new tokens, preempting newer sequences if needed."""
        while not self.blocks.allocate(seq.seq_id, seq.num_computed_tokens + num_new):
            # The newest running sequence goes first; those ahead of seq are planned already.
            victim = next(v for v in reversed(self.running) if not v.preempt_pending)
            if victim is seq:
                return False
            if victim.num_inflight_steps:
                victim.preempt_pending = True  # preempted when its steps return
                return False
            self._preempt(victim)
        return True

    def _admit(self, planned: list[tuple[Sequence, int, tuple[int, ...]]], budget: int,
               max_seqs: int) -> None:
        """Admits waiting sequences (oldest first) into planned while budget and blocks last."""
        while (self.waiting and budget > 0
               and len(planned) < max_seqs
               and self._workers_have_room()
               and not any(s.preempt_pending for s in self.running)):
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                cached = self.blocks.allocate_prefix(seq.seq_id, seq.token_ids, seq.extra_key)
                seq.num_computed_tokens = cached
                if not seq.output_ids:
                    seq.num_cached_prompt_tokens = cached
            num_new = seq.num_known_tokens - seq.num_computed_tokens
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget and planned:
                break  # unchunked: a prompt goes whole, alone if it exceeds the budget
            if not self.blocks.allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                self.blocks.free(seq.seq_id)  # drops the prefix refs; tried again next step
                seq.num_computed_tokens = 0
                break
            if not seq.output_ids:  # a first admission, not a preempted one's return
                self.num_prefix_hit_tokens += seq.num_cached_prompt_tokens
                self.num_prefix_query_tokens += len(seq.prompt_ids)
            seq.scheduled_time = seq.scheduled_time or time.monotonic()
            self.waiting.popleft()
            self.running.append(seq)
            planned.append((seq, num_new, ()))
            budget = max(0, budget - num_new)

    def _workers_have_room(self) -> bool:
        limit = self.config.max_live_seqs
        return not limit or len(self.running) < limit

    def _plan_seq(self, seq: Sequence, num_new: int, drafts: tuple[int, ...] = ()
                  ) -> ScheduledSeq:
        """seq's share of the step, as a delta against what the workers hold of it; drafts are
        its last len(drafts) inputs (proposals, not known tokens). Runs for every sequence of
        every step: a decode costs a few attribute reads."""
        start_pos = seq.num_computed_tokens
        end = start_pos + num_new
        num_known = seq.num_known_tokens
        known_end = min(end, num_known)
        start = None
        if seq.num_tokens_held_by_workers < 0:  # not on the workers: tokens, options travel once
            start = SeqStart(tuple(seq.tokens_between(0, num_known)), seq.params.sampling)
            seq.num_tokens_held_by_workers = num_known
        held_end = min(known_end, seq.num_tokens_held_by_workers)
        if known_end > start_pos:  # some inputs are known here
            token_ids = tuple(seq.tokens_between(max(start_pos, held_end), known_end)) + drafts
            num_supplied = max(0, held_end - start_pos) + len(token_ids)
        else:  # a decode of the token in flight
            token_ids, num_supplied = (), 0
        new_blocks = self.blocks.blocks_from(seq.seq_id, seq.num_blocks_sent)
        if new_blocks:
            new_blocks = tuple(new_blocks)
            seq.num_blocks_sent += len(new_blocks)
        else:
            new_blocks = ()
        sample = end >= num_known and seq.wants_more_samples
        seq.num_computed_tokens = end
        seq.num_inflight_steps += 1
        seq.num_inflight_samples += sample
        if drafts:
            self.num_drafts += 1
            self.num_draft_tokens += len(drafts)
            seq.verifying = True
        return ScheduledSeq(seq.seq_id, start_pos, num_new, new_blocks, token_ids,
                            num_supplied < num_new, sample, start, drafts)

    def _preempt(self, seq: Sequence) -> None:
        """Frees seq's blocks; it is recomputed from its known tokens when admitted again."""
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.preempt_pending = False
        seq.forget_workers()
        self.waiting.appendleft(seq)
        self._preempted_to_announce.append(seq.seq_id)  # workers drop what they hold of it
        self.num_preemptions += 1

    # -- results -----------------------------------------------------------------------------

    def on_result(self, plan: StepPlan, sampled: dict[int, list[int]],
                  proposals: dict[int, list[int]] | None = None) -> list[SeqUpdate]:
        """Applies one step's sampled tokens (ids per sequence) and a draft model's proposals
        for their next steps; returns what changed."""
        updates = []
        for item in plan.seqs:
            seq = self.seqs.get(item.seq_id)
            if seq is None:
                continue
            seq.num_inflight_steps -= 1
            if item.sample and self._drafts_from_results:  # they follow this step's tokens
                seq.draft_proposals = tuple((proposals or {}).get(item.seq_id, ()))
            start, num_new = item.num_computed_tokens, item.num_new_tokens
            tokens = sampled.get(item.seq_id) if item.sample else None
            if item.draft_token_ids:
                seq.verifying = False
            if item.draft_token_ids and seq.finish_reason is None:
                # The target's tokens up to the first that differs from a proposal: the KV of
                # the proposals after it is not the sequence's (its slots are written again),
                # and the accepted ones are known tokens only once appended.
                rejected = len(item.draft_token_ids) + 1 - len(tokens or ())
                self.num_accepted_tokens += len(item.draft_token_ids) - rejected
                for position in range(len(item.draft_token_ids) - rejected):
                    self.num_accepted_per_pos[position] += 1
                seq.num_computed_tokens -= rejected
                num_new -= rejected
                seq.num_inflight_samples -= 1
                if tokens:
                    updates.append(self._append_tokens(seq, tokens))
                self._commit_completed_blocks(seq, start, num_new)
            else:
                self._commit_completed_blocks(seq, start, num_new)
                if item.sample:
                    seq.num_inflight_samples -= 1
                    if tokens and seq.finish_reason is None:
                        updates.append(self._append_tokens(seq, tokens))
            if not seq.num_inflight_steps:
                self._settle(seq)
        return updates

    def _commit_completed_blocks(self, seq: Sequence, start: int, num_new: int) -> None:
        """Only a step that completed a block has news for the prefix cache (most decodes do
        not): blocks whose every token's KV is computed or ahead in the step order."""
        block_size = self.blocks.block_size
        if seq.finish_reason is None and start // block_size != (start + num_new) // block_size:
            self.blocks.commit(seq.seq_id, seq.token_view(seq.num_computed_tokens),
                               seq.extra_key)

    def _append_tokens(self, seq: Sequence, tokens: list[int]) -> SeqUpdate:
        """Appends tokens up to the first that ends the sequence (EOS or max_tokens)."""
        if not seq.output_ids and not seq.first_token_time:
            seq.first_token_time = time.monotonic()
            self.num_prompt_tokens += len(seq.prompt_ids)
        taken = []
        for token in tokens:
            seq.output_ids.append(token)
            taken.append(token)
            if token in self.config.eos_token_ids and not seq.params.ignore_eos:
                self._finish(seq, FinishReason.EOS)
            elif len(seq.output_ids) >= seq.params.max_tokens:
                self._finish(seq, FinishReason.LENGTH)
            if seq.is_finished:
                break
        self.num_generation_tokens += len(taken)
        return SeqUpdate(seq, taken, seq.finish_reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._settle(seq)

    def _settle(self, seq: Sequence) -> None:
        """Frees a finished or preempt-pending sequence once no step in flight uses it."""
        if seq.num_inflight_steps:
            return
        if seq.is_finished:
            self.blocks.free(seq.seq_id)
            if seq in self.running:
                self.running.remove(seq)
            self.seqs.pop(seq.seq_id, None)
            self._finished_to_announce.append(seq.seq_id)
        elif seq.preempt_pending:
            self._preempt(seq)

    def fail_all(self) -> list[Sequence]:
        """Ends every sequence with ERROR (the workers are gone); returns them."""
        failed = list(self.seqs.values())
        for seq in failed:
            seq.finish_reason = FinishReason.ERROR
            seq.num_inflight_steps = 0
            self.blocks.free(seq.seq_id)
        self.seqs.clear()
        self.waiting.clear()
        self.running.clear()
        return failed

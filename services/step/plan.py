"""The step contract as plain data: what one step asks every worker to do, and what comes back.

A delta protocol (as vLLM v1's scheduler output): a sequence's tokens, sampling options and
first blocks travel once, when it is first scheduled (`SeqStart`); every later step names only
the sequence, its number of new tokens, the blocks appended since, and the few input tokens the
workers cannot hold themselves. So a plan's size, and the work to build and read it, grows with
the tokens computed in the step, never with the context length.

    step k     seq 7: start(tokens=[p0 … p99], sampling), computed 0,  new 64, blocks [3 8 1 4]
    step k+1   seq 7: computed 64, new 36, blocks [9 2 6], sample                (rest of prompt)
    step k+2   seq 7: computed 100, new 1, append_last_sampled                    (a decode)
    step k+17  seq 7: computed 115, new 1, append_last_sampled, blocks [5]        (a block filled)

Inputs of a step for positions [c, c + n): the workers' held tokens (`start.token_ids`) from c
on, then `token_ids`, then, if `append_last_sampled`, the token the workers sampled last for
the sequence. Built by the scheduler, sent as `meshserve.internal.v1.StepPlan`, read back
into these types at the worker's servicer edge.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from meshserve.internal.v1 import worker_pb2 as pb

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (logits / T would overflow)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # < SAMPLING_EPS = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # mixed with the position, so reruns are exact

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def to_pb(self) -> pb.SamplingOptions:
        return pb.SamplingOptions(temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, seed=self.seed)

    @classmethod
    def from_pb(cls, msg: pb.SamplingOptions) -> SamplingOptions:
        seed = msg.seed if msg.HasField("seed") else None
        return cls(msg.temperature, msg.top_p or 1.0, msg.top_k, seed)


@dataclass(frozen=True)
class SeqStart:
    """What travels once per sequence: every token known when it is first scheduled (the
    prompt; after a preemption the outputs so far too) and how to sample it."""

    token_ids: tuple[int, ...]
    sampling: SamplingOptions

    def to_pb(self, index: int) -> pb.SeqStart:
        return pb.SeqStart(token_ids=self.token_ids, sampling=self.sampling.to_pb(), index=index)

    @classmethod
    def from_pb(cls, msg: pb.SeqStart) -> SeqStart:
        return cls(tuple(msg.token_ids), SamplingOptions.from_pb(msg.sampling))


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step: KV for positions [num_computed_tokens,
    num_computed_tokens + num_new_tokens), then (if sample) a token sampled after the last.
    A named tuple: the scheduler builds one per sequence per step and the worker reads one back,
    and a tuple is built in a fifth of a frozen dataclass's time (0.5 against 2.2 us here)."""

    seq_id: int
    num_computed_tokens: int
    num_new_tokens: int
    new_block_ids: tuple[int, ...] = ()  # appended to its block table (all of it with start)
    token_ids: tuple[int, ...] = ()  # inputs the workers do not hold (see the module doc)
    append_last_sampled: bool = False
    sample: bool = False
    start: SeqStart | None = None  # set on its first step only
    # speculative decoding: proposals to verify, its last len() inputs (greedy sequences: the
    # workers return the target's tokens up to and including the first that differs)
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    seqs: tuple[ScheduledSeq, ...]  # flattened in this order in the batch
    micro_batch: int = 0
    finished_seq_ids: tuple[int, ...] = field(default=())  # workers drop their state
    preempted_seq_ids: tuple[int, ...] = field(default=())  # the same; they start again later
    epoch: int = 0  # the scheduler process that made it (see StepPlan.epoch in worker.proto)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def sampled_seq_ids(self) -> list[int]:
        return [s.seq_id for s in self.seqs if s.sample]

    @property
    def dropped_seq_ids(self) -> tuple[int, ...]:
        return self.finished_seq_ids + self.preempted_seq_ids

    def to_pb(self) -> pb.StepPlan:
        """Columns of the sequences' fields (see StepPlan in worker.proto)."""
        seqs = self.seqs
        msg = pb.StepPlan(
            step_id=self.step_id, micro_batch=self.micro_batch,
            finished_seq_ids=self.finished_seq_ids, preempted_seq_ids=self.preempted_seq_ids,
            epoch=self.epoch, seq_ids=[s.seq_id for s in seqs],
            num_computed_tokens=[s.num_computed_tokens for s in seqs],
            num_new_tokens=[s.num_new_tokens for s in seqs], sample=[s.sample for s in seqs],
            append_last_sampled=[s.append_last_sampled for s in seqs])
        _put_ragged(msg.num_new_block_ids, msg.new_block_ids, [s.new_block_ids for s in seqs])
        _put_ragged(msg.num_token_ids, msg.token_ids, [s.token_ids for s in seqs])
        _put_ragged(msg.num_draft_token_ids, msg.draft_token_ids,
                    [s.draft_token_ids for s in seqs])
        msg.starts.extend(s.start.to_pb(i) for i, s in enumerate(seqs) if s.start is not None)
        return msg

    @classmethod
    def from_pb(cls, msg: pb.StepPlan) -> StepPlan:
        n = len(msg.seq_ids)
        starts = {s.index: SeqStart.from_pb(s) for s in msg.starts}
        columns = zip(msg.seq_ids, msg.num_computed_tokens, msg.num_new_tokens,
                      _ragged(msg.num_new_block_ids, msg.new_block_ids, n),
                      _ragged(msg.num_token_ids, msg.token_ids, n), msg.append_last_sampled,
                      msg.sample, _ragged(msg.num_draft_token_ids, msg.draft_token_ids, n),
                      strict=True)
        seqs = tuple(ScheduledSeq(seq_id, computed, new, blocks, tokens, append, sample,
                                  starts.get(i), drafts)
                     for i, (seq_id, computed, new, blocks, tokens, append, sample, drafts)
                     in enumerate(columns))
        return cls(msg.step_id, seqs, msg.micro_batch, tuple(msg.finished_seq_ids),
                   tuple(msg.preempted_seq_ids), msg.epoch)


def _put_ragged(counts, flat, rows: list[tuple[int, ...]]) -> None:
    """rows -> a count column and the flattened values; nothing at all when every row is empty."""
    if any(rows):
        counts.extend([len(r) for r in rows])
        flat.extend(itertools.chain.from_iterable(rows))


def _ragged(counts, flat, n: int) -> list[tuple[int, ...]]:
    """The inverse of _put_ragged: n rows (all empty when the count column is)."""
    if not counts:
        return [()] * n
    values, ends = tuple(flat), itertools.accumulate(counts)
    starts = itertools.chain((0,), itertools.accumulate(counts))
    return [values[a:b] for a, b in zip(starts, ends)]


@dataclass(frozen=True)
class StepResult:
    """Sampled ids of one step: seq_ids[i] received num_token_ids[i] ids (one each unless
    speculative decoding accepted more), flattened in token_ids."""

    step_id: int
    seq_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    micro_batch: int = 0
    num_token_ids: tuple[int, ...] = ()  # () = one id per sequence
    step_time_us: int = 0  # the worker's wall time for the step (inputs, model, sampling)
    # a draft model's proposals for each sequence's next step, flattened as token_ids
    proposal_ids: tuple[int, ...] = ()
    num_proposal_ids: tuple[int, ...] = ()  # () = no proposals

    def tokens_by_seq(self) -> dict[int, list[int]]:
        return _split(self.seq_ids, self.token_ids, self.num_token_ids or (1,) * len(self.seq_ids))

    def proposals_by_seq(self) -> dict[int, list[int]]:
        return _split(self.seq_ids, self.proposal_ids, self.num_proposal_ids)

    def to_pb(self) -> pb.StepResult:
        return pb.StepResult(step_id=self.step_id, micro_batch=self.micro_batch,
                             seq_ids=self.seq_ids, token_ids=self.token_ids,
                             num_token_ids=self.num_token_ids, step_time_us=self.step_time_us,
                             proposal_ids=self.proposal_ids,
                             num_proposal_ids=self.num_proposal_ids)

    @classmethod
    def from_pb(cls, msg: pb.StepResult) -> StepResult:
        return cls(msg.step_id, tuple(msg.seq_ids), tuple(msg.token_ids), msg.micro_batch,
                   tuple(msg.num_token_ids), msg.step_time_us, tuple(msg.proposal_ids),
                   tuple(msg.num_proposal_ids))


def _split(seq_ids, flat, counts) -> dict[int, list[int]]:
    """{seq_ids[i]: the counts[i] ids of flat after those of the sequences before}."""
    out, pos = {}, 0
    for seq_id, n in zip(seq_ids, counts):
        out[seq_id] = list(flat[pos:pos + n])
        pos += n
    return out

"""The scheduler -> worker contract as plain data: what one step asks every worker to do.

Built by the scheduler, sent as `meshserve.internal.v1.StepPlan`, read back into these types at
the worker's servicer edge. No torch here: the scheduler imports this module too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.internal.v1 import worker_pb2 as pb


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # mixed with the position, so reruns are exact

    @property
    def is_greedy(self) -> bool:  # what services.model.sample asks of its options
        return self.temperature == 0.0

    def to_pb(self) -> pb.SamplingOptions:
        return pb.SamplingOptions(temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, seed=self.seed)

    @classmethod
    def from_pb(cls, msg: pb.SamplingOptions) -> SamplingOptions:
        seed = msg.seed if msg.HasField("seed") else None
        return cls(msg.temperature, msg.top_p or 1.0, msg.top_k, seed)


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step.

    The step computes KV for positions [num_computed_tokens, num_computed_tokens + num_new_tokens)
    where the inputs are `token_ids`, then (if append_last_sampled) the token this worker group
    sampled last for the sequence.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    num_computed_tokens: int
    block_table: tuple[int, ...]
    sample: bool
    sampling: SamplingOptions
    append_last_sampled: bool = False

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + int(self.append_last_sampled)

    def to_pb(self) -> pb.ScheduledSeq:
        return pb.ScheduledSeq(
            seq_id=self.seq_id, token_ids=self.token_ids,
            append_last_sampled=self.append_last_sampled,
            num_computed_tokens=self.num_computed_tokens, block_table=self.block_table,
            sample=self.sample, sampling=self.sampling.to_pb())

    @classmethod
    def from_pb(cls, msg: pb.ScheduledSeq) -> ScheduledSeq:
        return cls(msg.seq_id, tuple(msg.token_ids), msg.num_computed_tokens,
                   tuple(msg.block_table), msg.sample, SamplingOptions.from_pb(msg.sampling),
                   msg.append_last_sampled)


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    seqs: tuple[ScheduledSeq, ...]
    micro_batch: int = 0
    finished_seq_ids: tuple[int, ...] = field(default=())
    epoch: int = 0  # the scheduler process that made it (see StepPlan.epoch in worker.proto)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def sampled_seq_ids(self) -> list[int]:
        return [s.seq_id for s in self.seqs if s.sample]

    def to_pb(self) -> pb.StepPlan:
        return pb.StepPlan(step_id=self.step_id, micro_batch=self.micro_batch,
                           seqs=[s.to_pb() for s in self.seqs],
                           finished_seq_ids=self.finished_seq_ids, epoch=self.epoch)

    @classmethod
    def from_pb(cls, msg: pb.StepPlan) -> StepPlan:
        return cls(msg.step_id, tuple(ScheduledSeq.from_pb(s) for s in msg.seqs),
                   msg.micro_batch, tuple(msg.finished_seq_ids), msg.epoch)


@dataclass(frozen=True)
class StepResult:
    step_id: int
    seq_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    micro_batch: int = 0

    def to_pb(self) -> pb.StepResult:
        return pb.StepResult(step_id=self.step_id, micro_batch=self.micro_batch,
                             seq_ids=self.seq_ids, token_ids=self.token_ids)

    @classmethod
    def from_pb(cls, msg: pb.StepResult) -> StepResult:
        return cls(msg.step_id, tuple(msg.seq_ids), tuple(msg.token_ids), msg.micro_batch)

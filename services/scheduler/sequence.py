"""A request as the scheduler sees it: token ids, progress counters, and how it ends.

Progress of one sequence (positions are token indices):

    known tokens   |<------------ prompt ------------>|<--- output --->|
    KV computed    |<------ num_computed_tokens ------------->|
    in flight      sampled by steps not yet returned: num_inflight_samples

Invariant: num_computed_tokens <= num_known_tokens + num_inflight_samples, and a step only
asks for tokens the workers can supply (known ids, or the one they sampled last).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from services.step import SamplingOptions


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class RequestParams:
    """What the scheduler needs of a request's sampling parameters."""

    max_tokens: int
    sampling: SamplingOptions
    ignore_eos: bool = False


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: RequestParams
    extra_key: bytes = b""
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_inflight_steps: int = 0
    num_inflight_samples: int = 0
    num_cached_prompt_tokens: int = 0
    finish_reason: FinishReason | None = None
    preempt_pending: bool = False
    # What the workers hold of it (the step contract is a delta): -1 = not started there.
    num_tokens_held_by_workers: int = -1
    num_blocks_sent: int = 0
    # time.monotonic() when it arrived, was first scheduled, got its first token (0 = not yet)
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float = 0.0
    first_token_time: float = 0.0
    ngram: object = None  # its speculative.NgramIndex, made at its first proposal
    # a draft model's proposals for the tokens after its last known one (from the last result)
    draft_proposals: tuple[int, ...] = ()
    verifying: bool = False  # a step with its proposals is in flight: how many it keeps is open

    @property
    def is_on_workers(self) -> bool:
        return self.num_tokens_held_by_workers >= 0

    def forget_workers(self) -> None:
        """After a preemption: its next step starts it on the workers again."""
        self.num_tokens_held_by_workers = -1
        self.num_blocks_sent = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens_between(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (the per-step path)."""
        num_prompt = len(self.prompt_ids)
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        if start >= num_prompt:
            return self.output_ids[start - num_prompt:end - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - num_prompt]

    def token_view(self, end: int) -> TokenView:
        """token_ids[:end] as a view: its slices are built on demand, never the whole list.
        It never reaches past the known tokens (num_computed_tokens may: a sample in flight)."""
        return TokenView(self, min(end, self.num_known_tokens))

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_more_samples(self) -> bool:
        """False once every token up to max_tokens is sampled or being sampled."""
        return len(self.output_ids) + self.num_inflight_samples < self.params.max_tokens


class TokenView:
    """The first `length` tokens of a sequence, sliceable without copying the rest."""

    def __init__(self, seq: Sequence, length: int):
        self.seq, self.length = seq, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: slice) -> list[int]:
        start, stop, step = index.indices(self.length)
        if step != 1:
            raise ValueError("a token view slices with step 1 only")
        return self.seq.tokens_between(start, stop)

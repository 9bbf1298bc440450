"""Checks of a public GenerateRequest, with messages that say what to change."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshserve.v1 import generation_pb2 as pb
from services.messages import shown

MAX_STOP_STRINGS = 16


class InvalidRequest(ValueError):
    """Becomes INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class ModelLimits:
    name: str
    max_context_tokens: int
    vocab_size: int


def check_request(req: pb.GenerateRequest, limits: ModelLimits) -> None:
    """Everything that can be checked before tokenizing."""
    if req.model and req.model != limits.name:
        raise InvalidRequest(f"unknown model {shown(req.model)}; this gateway serves {limits.name!r} "
                             "(leave model empty for it)")
    given = [bool(req.prompt), bool(req.prompt_token_ids), bool(req.messages)].count(True)
    if given != 1:
        raise InvalidRequest("set exactly one of prompt, prompt_token_ids and messages (the "
                             "prompt is " + ("empty)" if not given else "given twice)"))
    bad = [t for t in req.prompt_token_ids if t >= limits.vocab_size]
    if bad:
        raise InvalidRequest(f"prompt_token_ids holds {bad[0]}, outside the vocabulary "
                             f"[0, {limits.vocab_size})")
    check_sampling(req.sampling)


def check_sampling(s: pb.SamplingParams) -> None:
    if s.max_tokens < 1:
        raise InvalidRequest("sampling.max_tokens must be >= 1")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest(f"sampling.temperature must be >= 0 (0 = greedy), "
                             f"got {s.temperature}")
    # proto3 cannot tell 0 from unset: 0 means the default, 1.
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if len(s.stop) > MAX_STOP_STRINGS or any(not x for x in s.stop):
        raise InvalidRequest(f"sampling.stop takes at most {MAX_STOP_STRINGS} non-empty strings")


def check_length(num_prompt_tokens: int, max_tokens: int, limits: ModelLimits) -> None:
    """After tokenizing: prompt and completion must fit the context."""
    if num_prompt_tokens == 0:
        raise InvalidRequest("the prompt is empty after tokenization")
    if num_prompt_tokens >= limits.max_context_tokens:
        raise InvalidRequest(f"the prompt has {num_prompt_tokens} tokens; the context of "
                             f"{limits.name!r} is {limits.max_context_tokens} tokens, so the "
                             "prompt must be shorter")
    if num_prompt_tokens + max_tokens > limits.max_context_tokens:
        raise InvalidRequest(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds the context of {limits.max_context_tokens} tokens; lower "
                             f"max_tokens to at most "
                             f"{limits.max_context_tokens - num_prompt_tokens}")

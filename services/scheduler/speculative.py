"""Speculative decoding, the scheduler's half: which tokens to propose, and the settings.

n-gram prompt lookup (vLLM's "ngram" method): a sequence whose last n tokens occurred earlier
in its own tokens (prompt and output) proposes the tokens that followed that occurrence, for
the largest n in [prompt_lookup_min, prompt_lookup_max] that matches. The workers compute the
step's last sampled token and the K proposals in one step, K + 1 positions, and draw the
target's token at each position as a plain decode would there (greedy: the argmax; sampled: the
seeded draw of (seed, position, logits)); the tokens are kept up to and including the first that
differs from its proposal, so the output is the target's own whatever was proposed
(services/worker/runner.py). For a sampled request this is rejection sampling with a draft
that is a point mass, as an n-gram proposal is: the proposal x is kept with probability p(x)
(exactly when the target's draw is x) and otherwise the token drawn is distributed as p without
x, the residual distribution; drawing it from the seeded noise keeps every token a pure
function of (seed, position), with speculation on or off, on whichever replica.

A draft model (vLLM's "draft_model" method) proposes instead: the sampling worker runs it after
every step and returns its greedy next K tokens with the step's result
(services/worker/draft.py); the scheduler puts them in the sequence's next plan. Its proposals
are point masses too, so the same rule keeps the target's tokens.

A proposal is looked up in an index per sequence, n-gram -> where it last ended, extended by
the tokens the sequence gained since its last step: the per-step work is (max - min + 1)
dictionary operations per new token, whatever the context length.

Pure logic: no I/O, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 1
    # No proposals while more than this many sequences run (vLLM's name): where a step is
    # compute-bound, verifying rejected proposals costs more than accepted ones save. 0 = never.
    disable_by_batch_size: int = 0
    model: str = ""  # draft_model: the draft's checkpoint folder (the sampling worker runs it)

    @classmethod
    def parse(cls, text: str) -> SpeculativeConfig | None:
        """--speculative-config JSON as vLLM spells it; "" = off. ValueError says what to fix."""
        if not text:
            return None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--speculative-config is not JSON ({exc}): give e.g. "
                             '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
        if not isinstance(raw, dict):
            raise ValueError("--speculative-config must be a JSON object")
        method = raw.get("method")
        if method not in METHODS:
            raise ValueError(f"--speculative-config: method {method!r} is not one of {METHODS}")
        known = {"method", "num_speculative_tokens", "disable_by_batch_size"} | (
            {"prompt_lookup_max", "prompt_lookup_min"} if method == "ngram" else {"model"})
        if unknown := sorted(set(raw) - known):
            raise ValueError(f"--speculative-config: unknown keys {unknown} for {method}; known: "
                             f"{sorted(known)}")
        if method == "draft_model" and not (isinstance(raw.get("model"), str) and raw["model"]):
            raise ValueError('--speculative-config: draft_model needs "model", the draft\'s '
                             "checkpoint folder")
        model = raw.get("model", "")
        values = {k: raw[k] for k in known - {"method", "model"} if k in raw}
        if "num_speculative_tokens" not in values:
            raise ValueError("--speculative-config: num_speculative_tokens is required")
        for key, value in values.items():
            low = 0 if key == "disable_by_batch_size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--speculative-config: {key} must be an integer >= {low}, "
                                 f"got {value!r}")
        config = cls(method, **values, model=model)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"--speculative-config: prompt_lookup_min "
                             f"({config.prompt_lookup_min}) is above prompt_lookup_max "
                             f"({config.prompt_lookup_max})")
        return config


class NgramIndex:
    """The n-grams (n in [n_min, n_max]) of one sequence's tokens, each with where it last
    ended; proposals for the tokens after the last n."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self._last_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions <= this are in the index

    def propose(self, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        tokens (n_min <= n <= n_max) seen before; () when none occurred."""
        length = len(tokens)
        # Index every n-gram that ends before the last position: the suffix itself is not an
        # earlier occurrence of itself.
        for end in range(max(self._indexed, self.n_min), length):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self._last_end[tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, length)
        if k <= 0:
            return ()
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            end = self._last_end.get(tuple(tokens[length - n:length]))
            if end is not None:
                return tuple(tokens[end:end + k])
        return ()

"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling.

A seeded draw depends only on (seed, position, the row's logits): the uniform number comes from a
CPU torch.Generator seeded with mix(seed, position), so a rerun of the same request gives the same
tokens whatever else shares its batch, and on whatever device the logits live.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # None = nondeterministic

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, options: Sequence[SamplingOptions], positions: Sequence[int]) -> list[int]:
    """logits [n, vocab] float32; options[i] and positions[i] (the position of the token being
    chosen, i.e. the sequence length before it) belong to row i. Returns n token ids."""
    if not len(options) == len(positions) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows, {len(options)} options, {len(positions)} positions")
    tokens = logits.argmax(dim=-1).tolist()  # [n], greedy for every row at once
    for row, (opts, position) in enumerate(zip(options, positions)):
        if not opts.is_greedy:
            tokens[row] = _sample_row(logits[row], opts, position)
    return tokens


def _sample_row(logits: torch.Tensor, opts: SamplingOptions, position: int) -> int:
    """logits [vocab] -> one token id, drawn by inverse CDF over the kept, sorted tokens."""
    sorted_logits, sorted_ids = torch.sort(logits.float() / opts.temperature, descending=True, stable=True)  # [vocab]
    if opts.top_k > 0:
        sorted_logits[opts.top_k :] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    if opts.top_p < 1.0:
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
        probs = probs.masked_fill(mass_before >= opts.top_p, 0.0)  # the top token always stays
    cdf = torch.cumsum(probs.double(), dim=-1)  # [vocab], unnormalised
    u = _uniform(opts.seed, position).to(cdf.device) * cdf[-1]  # in [0, total mass)
    index = torch.searchsorted(cdf, u.reshape(1), right=True)  # first i with cdf[i] > u
    index = index.clamp_(max=int((probs > 0).sum()) - 1)  # guards u rounding up to the total
    return int(sorted_ids[index].item())


def _uniform(seed: int | None, position: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(_mix(seed, position))
    return torch.rand((), generator=generator, dtype=torch.float64)


def _mix(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): nearby seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)

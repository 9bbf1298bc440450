"""Next-token choice from logits, batched on the logits' device: greedy, or temperature / top-k /
top-p sampling.

A seeded draw depends only on (seed, position, the row's logits): its uniform number is a counter-
based hash, SplitMix64 of (seed, position), computed with int64 tensor arithmetic next to the
logits, so a rerun of the same request gives the same tokens whatever else shares its batch and in
whatever order. That number is bit-identical on CPU and CUDA; the probabilities it is compared with
come from the device's softmax and can differ in the last bits from one device to another.

`sample_batch` is a fixed sequence of batched tensor ops: no per-row Python and no host sync.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (logits / T would overflow)

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # below SAMPLING_EPS = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # None = nondeterministic

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def sample(logits: torch.Tensor, options: Sequence[SamplingOptions], positions: Sequence[int]) -> list[int]:
    """logits [n, vocab] float32; options[i] and positions[i] (the position of the token being
    chosen, i.e. the sequence length before it) belong to row i. Returns n token ids.

    A list-based front to `sample_batch`; an option without a seed draws a fresh one per call."""
    if not len(options) == len(positions) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows, {len(options)} options, {len(positions)} positions")

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:  # [n] on the logits' device
        return torch.tensor(values, dtype=dtype, device=logits.device)

    seeds = [to_int64(random.getrandbits(63) if o.seed is None else o.seed) for o in options]
    tokens = sample_batch(
        logits,
        temperature=column([o.temperature for o in options], torch.float32),
        top_p=column([o.top_p for o in options], torch.float32),
        top_k=column([o.top_k for o in options], torch.int64),
        seeds=column(seeds, torch.int64),
        positions=column(list(positions), torch.int64),
        all_greedy=all(o.is_greedy for o in options),
    )
    return tokens.tolist()


def sample_batch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    all_greedy: bool = False,
) -> torch.Tensor:
    """logits [n, V] float32; temperature, top_p [n] float32; top_k [n] int64 (0 = no limit);
    seeds, positions [n] int64 (a uint64 seed goes in as `to_int64(seed)`); all on logits.device.
    Returns [n] int64 token ids on that device.

    all_greedy (known on the host) takes the argmax for the whole batch. Otherwise a row with
    temperature < SAMPLING_EPS takes its argmax, and so does a row whose probabilities are not
    finite (a NaN or +inf logit, every logit -inf, or logits / T overflowing): -inf logits alone are
    fine, they get probability 0. The other rows draw by inverse CDF over their kept tokens."""
    greedy_tokens = argmax_ids(logits)  # [n]
    if all_greedy:
        return greedy_tokens
    is_greedy = temperature < SAMPLING_EPS  # [n]
    sampled_tokens, is_finite = _sample_rows(
        logits, temperature.masked_fill(is_greedy, 1.0), top_p, top_k, uniform(seeds, positions)
    )
    return torch.where(is_greedy | ~is_finite, greedy_tokens, sampled_tokens)


def argmax_ids(logits: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] int64 argmax ids; on GPUs split over the vocabulary (triton_ops.argmax_rows)."""
    from services.model.layers import uses_triton

    if uses_triton(logits):
        from services.model.triton_ops import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def _sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws by inverse CDF over each row's kept tokens, sorted best first: the first sorted index
    whose cdf exceeds u * (kept mass). Returns [n] token ids and [n] bool, whether the row's
    probabilities are finite (where they are not, its token is a valid id but meaningless)."""
    scaled = logits.float() / temperature[:, None]  # [n, V]
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [n, V]
    probs = torch.softmax(_mask_past_top_k(sorted_logits, top_k), dim=-1)  # [n, V], non-increasing
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # [n, V], non-decreasing, unnormalised
    last = (_num_kept(probs, cdf, top_p) - 1)[:, None]  # [n, 1], index of the last kept token
    target = u[:, None] * cdf.gather(1, last)  # [n, 1], in [0, kept mass)
    index = torch.searchsorted(cdf, target, right=True)  # [n, 1], first i with cdf[i] > target
    index = index.minimum(last)  # guards target rounding up to the kept mass
    return sorted_ids.gather(1, index).squeeze(1), cdf[:, -1].isfinite()


def _mask_past_top_k(sorted_logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """sorted_logits [n, V], best first -> the same with -inf past each row's first top_k (0 = all)."""
    rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)  # [V]
    past_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])  # [n, V]
    return sorted_logits.masked_fill(past_k, float("-inf"))


def _num_kept(probs: torch.Tensor, cdf: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[n] int64 in [1, V]: the length of each row's kept prefix, the tokens of probability > 0
    whose strictly better tokens hold less than top_p of the mass (top_p >= 1 keeps all of them).
    The top token always stays. Both conditions hold on a prefix: probs fall and cdf rises."""
    mass_before = cdf[:, :-1]  # [n, V - 1], mass_before[:, i] = mass of the tokens better than i + 1
    num_within_p = 1 + (mass_before < top_p[:, None]).sum(dim=-1)  # [n]
    num_within_p = num_within_p.masked_fill(top_p >= 1.0, probs.shape[-1])
    num_positive = (probs > 0).sum(dim=-1)  # [n]
    return torch.minimum(num_within_p, num_positive).clamp_(min=1)


def uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """seeds, positions [n] int64 -> [n] float64 in [0, 1): (_mix(seed, position) >> 10) * 2**-53,
    the top 53 of its 63 bits, bit-identical to the Python `_mix` on every device.

    int64 stands in for uint64: + and * wrap mod 2**64 just the same, but >> is arithmetic, so
    every right shift is masked back to a logical one."""
    z = seeds * to_int64(0x9E3779B97F4A7C15) + positions + 1  # [n]
    z = (z ^ _shift_right(z, 30)) * to_int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * to_int64(0x94D049BB133111EB)
    mixed = (z ^ _shift_right(z, 31)) & _MASK63  # [n], = _mix(seed, position), in [0, 2**63)
    return (mixed >> 10).double() * 2.0**-53  # exact: the integer is below 2**53


def to_int64(value: int) -> int:
    """The int64 with value's low 64 bits (two's complement): how a uint64 seed, such as the proto's,
    goes into an int64 tensor. `_mix` reads only those bits, so the draw does not change."""
    low = value & _MASK64
    return low - (1 << 64) if low >> 63 else low


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 z read as uint64."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): nearby seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63

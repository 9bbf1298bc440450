from __future__ import annotations

import math
import random

import pytest
import torch

from services.model.sampler import (
    SAMPLING_EPS,
    SamplingOptions,
    _mix,
    sample,
    sample_batch,
    to_int64,
    uniform,
)

GREEDY = SamplingOptions()


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])  # [1, vocab]


def draws(probs: list[float], options: SamplingOptions, num_positions: int = 400) -> list[int]:
    logits = logits_of(probs)
    return [sample(logits, [options], [pos])[0] for pos in range(num_positions)]


def batch_of(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seeds: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> dict:
    """sample_batch's keyword arguments for logits [n, V], one option for every row."""
    n = logits.shape[0]
    return dict(
        logits=logits,
        temperature=torch.full((n,), temperature),
        top_p=torch.full((n,), top_p),
        top_k=torch.full((n,), top_k),
        seeds=torch.arange(n) if seeds is None else seeds,
        positions=torch.zeros(n, dtype=torch.int64) if positions is None else positions,
    )


def many_draws(probs: list[float], num_draws: int, **options) -> torch.Tensor:
    """[num_draws] tokens for one row of logits, drawn with seeds 0 .. num_draws - 1."""
    return sample_batch(**batch_of(logits_of(probs).expand(num_draws, -1), **options))


# uniform


def test_uniform_is_the_top_53_bits_of_the_python_mix() -> None:
    rng = random.Random(0)
    edge_seeds = [0, 1, 2, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1]
    pairs = [(s, p) for s in edge_seeds for p in (0, 1, 2, 4095, 2**31, 2**62)]
    pairs += [(rng.getrandbits(64), rng.getrandbits(rng.choice([4, 16, 40]))) for _ in range(5000)]
    seeds = torch.tensor([to_int64(s) for s, _ in pairs])
    positions = torch.tensor([p for _, p in pairs])
    u = uniform(seeds, positions)
    assert u.dtype == torch.float64
    assert u.tolist() == [(_mix(s, p) >> 10) * 2.0**-53 for s, p in pairs]
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0


def test_to_int64_keeps_the_low_64_bits() -> None:
    assert [to_int64(v) for v in (0, 2**63 - 1, 2**63, 2**64 - 1, 2**64 + 5, -1)] == [
        0, 2**63 - 1, -(2**63), -1, 5, -1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uniform_is_identical_on_cuda() -> None:
    seeds = torch.randint(-(2**63), 2**63 - 1, (100_000,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100_000) * 7919
    on_cuda = uniform(seeds.cuda(), positions.cuda()).cpu()
    assert torch.equal(on_cuda, uniform(seeds, positions))


# greedy


def test_greedy_is_the_argmax_of_every_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 0.0], [0.0, 0.0, 0.5]])
    assert sample(logits, [GREEDY] * 3, [0, 7, 9]) == [1, 0, 2]


def test_is_greedy_below_sampling_eps() -> None:
    assert SAMPLING_EPS == 1e-5
    assert [SamplingOptions(temperature=t).is_greedy for t in (0.0, 1e-40, 9e-6, 1e-5, 0.5)] == [
        True, True, True, False, False]


def test_tiny_temperature_gives_the_argmax() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, -5.0]])  # 1 / 1e-40 overflows float32 to inf
    opts = SamplingOptions(temperature=1e-40, seed=0)
    assert [sample(logits, [opts], [pos])[0] for pos in range(50)] == [0] * 50


def test_greedy_rows_in_a_sampled_batch_take_the_argmax() -> None:
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    kwargs = batch_of(logits)
    kwargs["temperature"][::2] = torch.tensor([0.0, 1e-40, 9e-6, -1.0] * 4)  # even rows greedy
    tokens = sample_batch(**kwargs)
    assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))
    assert not torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))  # the odd rows sample


def test_all_greedy_equals_per_row_greedy() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(2))
    kwargs = batch_of(logits, temperature=0.0)
    fast = sample_batch(**kwargs, all_greedy=True)
    assert fast.dtype == torch.int64
    assert torch.equal(fast, sample_batch(**kwargs, all_greedy=False))
    assert torch.equal(fast, logits.argmax(dim=-1))


# seeded draws


def test_seeded_draw_ignores_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    opts = SamplingOptions(temperature=1.0, seed=1234)
    alone = sample(logits[2:3], [opts], [17])
    others = [GREEDY, SamplingOptions(temperature=0.7, seed=9), opts, SamplingOptions(temperature=2.0)]
    batched = sample(logits, others, [3, 5, 17, 1])
    assert batched[2] == alone[0]
    assert batched[0] == int(logits[0].argmax())


def test_seeded_draw_is_a_function_of_seed_position_and_row() -> None:
    g = torch.Generator().manual_seed(3)
    n = 24
    kwargs = dict(
        logits=torch.randn(n, 100, generator=g) * 3,
        temperature=torch.rand(n, generator=g) * 2 + 0.1,
        top_p=torch.tensor([1.0, 0.9, 0.5] * 8),
        top_k=torch.tensor([0, 0, 5, 50] * 6),
        seeds=torch.randint(-(2**63), 2**63 - 1, (n,), generator=g),
        positions=torch.randint(0, 10_000, (n,), generator=g),
    )
    batched = sample_batch(**kwargs)
    alone = torch.cat([sample_batch(**{k: v[i : i + 1] for k, v in kwargs.items()}) for i in range(n)])
    order = torch.randperm(n, generator=g)
    shuffled = sample_batch(**{k: v[order] for k, v in kwargs.items()})
    assert torch.equal(batched, alone)
    assert torch.equal(shuffled, batched[order])


def test_seed_and_position_decide_the_draw() -> None:
    opts = SamplingOptions(temperature=1.0, seed=42)
    uniform_probs = [1 / 32] * 32
    first, again = draws(uniform_probs, opts, 64), draws(uniform_probs, opts, 64)
    assert first == again
    assert len(set(first)) > 16  # positions give different draws
    assert draws(uniform_probs, SamplingOptions(temperature=1.0, seed=43), 64) != first


def test_a_uint64_seed_draws_as_its_int64_twin() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(4))
    big = [sample(logits, [SamplingOptions(temperature=1.0, seed=2**64 - 1 - i)], [i])[0] for i in range(20)]
    twin = sample_batch(**batch_of(logits.expand(20, -1), seeds=-1 - torch.arange(20), positions=torch.arange(20)))
    assert big == twin.tolist()


def test_unseeded_sampling_returns_valid_ids() -> None:
    picks = draws([0.5, 0.5], SamplingOptions(temperature=1.0), 50)
    assert set(picks) == {0, 1}  # fresh seeds per call: 50 identical picks would be a 2**-49 fluke


# the distribution


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_draws_follow_softmax_of_logits_over_t() -> None:
    logits = torch.tensor([[1.0, -0.5, 0.3, 2.0, -2.0, 0.0, 1.5, -1.0]])  # [1, 8]
    num_draws = 40_000
    tokens = sample_batch(**batch_of(logits.expand(num_draws, -1), temperature=0.7))
    probs = torch.softmax(logits[0] / 0.7, dim=-1)
    assert chi_square(tokens, probs) < 24.32  # 7 degrees of freedom, p = 0.001
    freqs = torch.bincount(tokens, minlength=8).double() / num_draws
    assert float((freqs - probs).abs().max()) < 0.01


def test_temperature_sharpens() -> None:
    cold = draws([0.4, 0.6], SamplingOptions(temperature=0.1, seed=3))
    assert cold.count(1) / len(cold) > 0.95  # p ∝ p^(1/T): 0.6^10 / (0.4^10 + 0.6^10) ≈ 0.98


# top-k and top-p


def test_top_k_keeps_the_k_best() -> None:
    picks = draws([0.1, 0.3, 0.05, 0.25, 0.3], SamplingOptions(temperature=1.0, top_k=3, seed=5))
    assert set(picks) == {1, 3, 4}
    one = draws([0.1, 0.3, 0.05, 0.25, 0.3], SamplingOptions(temperature=5.0, top_k=1, seed=5), 50)
    assert set(one) == {1}  # ties keep the lower id first


def test_top_k_per_row_never_leaves_the_row_top_k() -> None:
    g = torch.Generator().manual_seed(6)
    num_rows, num_draws = 8, 500
    logits = torch.randn(num_rows, 100, generator=g)
    top_k = torch.tensor([1, 2, 3, 5, 10, 40, 99, 0])
    rows = torch.arange(num_rows).repeat_interleave(num_draws)  # [num_rows * num_draws]
    kwargs = batch_of(logits[rows], temperature=3.0)  # hot: the tail would be drawn without a limit
    kwargs["top_k"] = top_k[rows]
    tokens = sample_batch(**kwargs).reshape(num_rows, num_draws)
    ranks = logits.argsort(dim=-1, descending=True).argsort(dim=-1)  # [num_rows, V], 0 = best
    drawn_ranks = ranks.gather(1, tokens)  # [num_rows, num_draws]
    max_ranks = drawn_ranks.max(dim=-1).values.tolist()
    assert all(rank < (k or 100) for rank, k in zip(max_ranks, top_k.tolist()))
    assert max_ranks[-1] >= 40  # without a limit the tail is drawn


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(1e-6, {0}), (0.5, {0}), (0.5001, {0, 1}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2})],
)
def test_top_p_keeps_the_tokens_whose_better_mass_is_below_p(top_p: float, kept: set[int]) -> None:
    # probs [0.5, 0.3, 0.2]: the mass of the strictly better tokens is [0, 0.5, 0.8]
    assert set(many_draws([0.5, 0.3, 0.2], 1000, top_p=top_p).tolist()) == kept


def test_top_p_renormalises_over_the_kept_tokens() -> None:
    tokens = many_draws([0.5, 0.3, 0.2], 20_000, top_p=0.6)
    kept = torch.tensor([0.5, 0.3]) / 0.8
    assert chi_square(tokens, kept) < 10.83  # 1 degree of freedom, p = 0.001


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    picks = draws([0.1, 0.4, 0.2, 0.3], SamplingOptions(temperature=1.0, top_p=0.6, seed=11))
    assert set(picks) == {1, 3}  # 0.4 < 0.6, 0.4 + 0.3 >= 0.6: token 2 and 0 are dropped


def test_top_p_zero_still_keeps_the_top_token() -> None:
    assert set(many_draws([0.1, 0.4, 0.2, 0.3], 200, top_p=0.0).tolist()) == {1}


def test_top_p_applies_after_top_k() -> None:
    # top_k=2 leaves [0.4, 0.3] / 0.7 = [0.571, 0.429]: top_p 0.55 then keeps token 1 only
    assert set(many_draws([0.1, 0.4, 0.2, 0.3], 200, top_k=2, top_p=0.55).tolist()) == {1}
    assert set(many_draws([0.1, 0.4, 0.2, 0.3], 200, top_k=2, top_p=0.6).tolist()) == {1, 3}


# non-finite logits


def test_minus_inf_logits_are_never_drawn() -> None:
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.0, -inf, 0.0, -inf]])
    assert set(sample_batch(**batch_of(logits.expand(500, -1), temperature=2.0)).tolist()) == {1, 3}


def test_non_finite_rows_take_their_argmax() -> None:
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [0.0, nan, 1.0, 2.0],  # NaN: argmax picks the NaN
        [0.0, 1.0, inf, 2.0],  # +inf: certain
        [-inf, -inf, -inf, -inf],  # nothing finite: token 0
        [1e35, 3e35, 2e35, 0.0],  # / 1e-4 overflows to inf
        [0.0, -inf, 5.0, -inf],  # -inf alone is fine: sampled, here certain at T = 0.1
    ])
    kwargs = batch_of(logits)
    kwargs["temperature"] = torch.tensor([1.0, 1.0, 1.0, 1e-4, 0.1])
    assert sample_batch(**kwargs).tolist() == [1, 2, 0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_never_syncs_and_draws_as_on_cpu() -> None:
    g = torch.Generator().manual_seed(8)
    n = 256
    kwargs = batch_of(torch.randn(n, 8, generator=g) * 2, temperature=0.9, top_p=0.9, top_k=6,
                      seeds=torch.randint(-(2**63), 2**63 - 1, (n,), generator=g), positions=torch.arange(n))
    kwargs["temperature"][::4] = 0.0
    on_cuda = {k: v.cuda() for k, v in kwargs.items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_batch(**on_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device == on_cuda["logits"].device
    # Same uniforms; the softmax may differ in the last bits, which these fixed rows never straddle.
    assert torch.equal(tokens.cpu(), sample_batch(**kwargs))


# shapes


def test_llama3_vocab_batch_runs() -> None:
    logits = torch.randn(64, 128_256, generator=torch.Generator().manual_seed(7))
    kwargs = batch_of(logits, temperature=0.8, top_p=0.95, top_k=50)
    tokens = sample_batch(**kwargs)
    assert tokens.shape == (64,) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 128_256


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 logit rows, 1 options"):
        sample(torch.zeros(2, 4), [GREEDY], [0, 1])

from __future__ import annotations

import math

import pytest
import torch

from services.model.sampler import SamplingOptions, sample

GREEDY = SamplingOptions()


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])  # [1, vocab]


def draws(probs: list[float], options: SamplingOptions, num_positions: int = 400) -> list[int]:
    logits = logits_of(probs)
    return [sample(logits, [options], [pos])[0] for pos in range(num_positions)]


def test_greedy_is_the_argmax_of_every_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 0.0], [0.0, 0.0, 0.5]])
    assert sample(logits, [GREEDY] * 3, [0, 7, 9]) == [1, 0, 2]


def test_seeded_draw_ignores_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    opts = SamplingOptions(temperature=1.0, seed=1234)
    alone = sample(logits[2:3], [opts], [17])
    others = [GREEDY, SamplingOptions(temperature=0.7, seed=9), opts, SamplingOptions(temperature=2.0)]
    batched = sample(logits, others, [3, 5, 17, 1])
    assert batched[2] == alone[0]
    assert batched[0] == int(logits[0].argmax())


def test_seed_and_position_decide_the_draw() -> None:
    opts = SamplingOptions(temperature=1.0, seed=42)
    uniform = [1 / 32] * 32
    first, again = draws(uniform, opts, 64), draws(uniform, opts, 64)
    assert first == again
    assert len(set(first)) > 16  # positions give different draws
    assert draws(uniform, SamplingOptions(temperature=1.0, seed=43), 64) != first


def test_draws_follow_the_distribution() -> None:
    picks = draws([0.25, 0.75], SamplingOptions(temperature=1.0, seed=7), 2000)
    assert abs(picks.count(1) / 2000 - 0.75) < 0.04


def test_temperature_sharpens() -> None:
    cold = draws([0.4, 0.6], SamplingOptions(temperature=0.1, seed=3))
    assert cold.count(1) / len(cold) > 0.95  # p ∝ p^(1/T): 0.6^10 / (0.4^10 + 0.6^10) ≈ 0.98


def test_top_k_keeps_the_k_best() -> None:
    picks = draws([0.1, 0.3, 0.05, 0.25, 0.3], SamplingOptions(temperature=1.0, top_k=3, seed=5))
    assert set(picks) == {1, 3, 4}
    one = draws([0.1, 0.3, 0.05, 0.25, 0.3], SamplingOptions(temperature=5.0, top_k=1, seed=5), 50)
    assert set(one) == {1}  # ties keep the lower id first


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    picks = draws([0.1, 0.4, 0.2, 0.3], SamplingOptions(temperature=1.0, top_p=0.6, seed=11))
    assert set(picks) == {1, 3}  # 0.4 < 0.6, 0.4 + 0.3 >= 0.6: token 2 and 0 are dropped
    tiny_p = draws([0.1, 0.4, 0.2, 0.3], SamplingOptions(temperature=1.0, top_p=1e-6, seed=11), 50)
    assert set(tiny_p) == {1}


def test_unseeded_sampling_returns_valid_ids() -> None:
    picks = draws([0.5, 0.5], SamplingOptions(temperature=1.0), 50)
    assert set(picks) <= {0, 1}


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 logit rows, 1 options"):
        sample(torch.zeros(2, 4), [GREEDY], [0, 1])

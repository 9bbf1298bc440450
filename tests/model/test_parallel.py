from __future__ import annotations

import pytest
import torch

from services.model.comm import count_collectives, tp_all_gather, tp_all_reduce
from services.model.parallel import ParallelContext, kv_head_start, kv_heads_per_rank, stage_layer_range


def test_balanced_stages_give_earlier_stages_the_extra_layer() -> None:
    assert [stage_layer_range(10, 4, r) for r in range(4)] == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert [stage_layer_range(4, 4, r) for r in range(4)] == [range(r, r + 1) for r in range(4)]
    assert stage_layer_range(4, 1, 0) == range(0, 4)


def test_explicit_split() -> None:
    assert [stage_layer_range(10, 2, r, split=[4, 6]) for r in range(2)] == [range(0, 4), range(4, 10)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 2, 0, [4, 5]), "sums to 9; give positive counts that sum to num_hidden_layers=10"),
        ((10, 2, 0, [10]), "has 1 entries; give one per stage"),
        ((3, 4, 0, None), "pp_size=4 exceeds num_layers=3"),
        ((4, 2, 2, None), "pp_rank=2 must be in"),
    ],
)
def test_bad_splits_say_what_to_change(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_layer_range(*args)


def test_kv_heads_split_then_replicated() -> None:
    # 4 KV heads: TP=2 splits 2 + 2; TP=8 replicates each head on 2 ranks
    assert kv_heads_per_rank(4, 2) == 2 and [kv_head_start(4, 2, r) for r in range(2)] == [0, 2]
    assert kv_heads_per_rank(4, 8) == 1 and [kv_head_start(4, 8, r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [kv_head_start(2, 4, r) for r in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="tp_size=3 exceeds num_key_value_heads=2"):
        kv_heads_per_rank(2, 3)
    with pytest.raises(ValueError, match="num_key_value_heads=6 is not divisible by tp_size=4"):
        kv_heads_per_rank(6, 4)


def test_context_checks_its_fields() -> None:
    ctx = ParallelContext(pp_rank=1, pp_size=3)
    assert (ctx.is_first_stage, ctx.is_last_stage) == (False, False)
    assert ParallelContext().is_first_stage and ParallelContext().is_last_stage
    with pytest.raises(ValueError, match="needs a tp_group"):
        ParallelContext(tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="tp_rank=2 must be in"):
        ParallelContext(tp_rank=2, tp_size=2, tp_group=object())


def test_collectives_are_no_ops_and_uncounted_at_tp1() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    with count_collectives() as counts:
        assert tp_all_reduce(x, ParallelContext()) is x
        assert tp_all_gather(x, ParallelContext()) is x
    assert counts == {}

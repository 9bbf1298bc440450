"""Who holds what: the TP × PP grid of one replica, passed explicitly to every layer.

Each pipeline stage's TP ranks form their own `torch.distributed` world (PP stages talk over the
stage link, not torch.distributed), so the TP group is never "the" global group of a replica:

    replica, TP=2 × PP=2          torch.distributed worlds
    ┌──────────────┬──────────────┐
    │ stage 0: r0  │ stage 0: r1  │  world A (size 2)
    ├──────────────┼──────────────┤
    │ stage 1: r0  │ stage 1: r1  │  world B (size 2)
    └──────────────┴──────────────┘
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None  # torch.distributed ProcessGroup; None when tp_size == 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} must be in [0, tp_size={self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank={self.pp_rank} must be in [0, pp_size={self.pp_size})")
        if self.tp_size > 1 and self.tp_group is None:
            raise ValueError(f"tp_size={self.tp_size} needs a tp_group; build one with init_tp_group")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def stage_layer_range(
    num_layers: int, pp_size: int, pp_rank: int, split: Sequence[int] | None = None
) -> range:
    """The contiguous slab of layers that stage `pp_rank` holds.

    Balanced by default, earlier stages taking the extra layer: 10 layers over 4 stages -> 3,3,2,2.
    `split` gives the layer count of every stage explicitly, e.g. [4, 6] for 10 layers over 2.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, pp_size={pp_size})")
    if split is None:
        if pp_size > num_layers:
            raise ValueError(f"pp_size={pp_size} exceeds num_layers={num_layers}; lower pp_size")
        base, extra = divmod(num_layers, pp_size)
        split = [base + (1 if rank < extra else 0) for rank in range(pp_size)]
    _check_split(split, num_layers, pp_size)
    start = sum(split[:pp_rank])
    return range(start, start + split[pp_rank])


def _check_split(split: Sequence[int], num_layers: int, pp_size: int) -> None:
    if len(split) != pp_size:
        raise ValueError(f"layer split {list(split)} has {len(split)} entries; give one per stage ({pp_size})")
    if sum(split) != num_layers or min(split) < 1:
        raise ValueError(
            f"layer split {list(split)} sums to {sum(split)}; give positive counts that sum to "
            f"num_hidden_layers={num_layers}"
        )


def init_tp_group(
    init_method: str,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    backend: str | None = None,
) -> ParallelContext:
    """Joins this stage's TP world (world_size = tp_size) and returns the context to pass down.

    `init_method` is a torch.distributed rendezvous ("tcp://host:port" or "file:///path"), distinct
    per stage. At tp_size 1 no process group is made. On GPUs call torch.cuda.set_device first.
    """
    if tp_size == 1:
        return ParallelContext(tp_rank=0, tp_size=1, pp_rank=pp_rank, pp_size=pp_size)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=init_method, rank=tp_rank, world_size=tp_size)
    return ParallelContext(tp_rank, tp_size, dist.group.WORLD, pp_rank, pp_size)


def close_tp_group(ctx: ParallelContext) -> None:
    if ctx.tp_group is not None and dist.is_initialized():
        dist.destroy_process_group()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what}={numerator} is not divisible by tp_size={denominator}; pick a tp_size that divides it"
        )
    return numerator // denominator


def kv_heads_per_rank(total_num_kv_heads: int, tp_size: int) -> int:
    """KV heads split across ranks; replicated (one per rank) once tp_size exceeds them."""
    if tp_size >= total_num_kv_heads:
        if tp_size % total_num_kv_heads:
            raise ValueError(
                f"tp_size={tp_size} exceeds num_key_value_heads={total_num_kv_heads} without being a "
                "multiple of it; pick a tp_size that divides or is a multiple of the KV head count"
            )
        return 1
    return divide(total_num_kv_heads, tp_size, "num_key_value_heads")


def kv_head_start(total_num_kv_heads: int, tp_size: int, tp_rank: int) -> int:
    """First KV head of `tp_rank`: the head its query heads read.

    8 q heads, 2 kv heads, TP=4:   rank   q heads   kv head
                                   0      0,1       0
                                   1      2,3       0     (replica)
                                   2      4,5       1
                                   3      6,7       1     (replica)
    """
    if tp_size >= total_num_kv_heads:
        return tp_rank * total_num_kv_heads // tp_size
    return tp_rank * kv_heads_per_rank(total_num_kv_heads, tp_size)

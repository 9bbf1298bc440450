"""Every tensor-parallel collective of the model, and nothing else.

Conjugate pairs (Megatron): a column-parallel layer needs no communication in forward and its
row-parallel partner ends with `tp_all_reduce`; the vocab-split LM head ends with `tp_all_gather`.
At tp_size 1 both are no-ops and are not counted.

    with count_collectives() as counts:
        model.forward(...)
    counts["all_reduce"]  # real all-reduces issued while inside
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from services.model.parallel import ParallelContext

_active_counters: list[Counter[str]] = []
_counters_lock = threading.Lock()


@contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Counts, by name, the collectives actually issued (tp_size > 1) inside the block."""
    counts: Counter[str] = Counter()
    with _counters_lock:
        _active_counters.append(counts)
    try:
        yield counts
    finally:
        with _counters_lock:
            _active_counters.remove(counts)


def _record(name: str) -> None:
    for counts in _active_counters:
        counts[name] += 1


def tp_all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """x <- sum of x over the TP ranks, in place."""
    if ctx.tp_size == 1:
        return x
    _record("all_reduce")
    dist.all_reduce(x, group=ctx.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """[..., n, ...] per rank -> [..., n * tp_size, ...], rank order along `dim`."""
    if ctx.tp_size == 1:
        return x
    _record("all_gather")
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, x, group=ctx.tp_group)
    return torch.cat(parts, dim=dim)

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
import time
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


class CollectiveTotals:
    """What this process's TP collectives moved since it started: calls and bytes per
    operation (the worker's metrics). Collectives inside a CUDA graph run on its replays, which
    add what their capture recorded (`add_all`)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        # Wall time of the collectives where the host waits for them (gloo, on CPUs). On GPUs
        # NCCL runs them on the device inside the step (its time is in the step time).
        self.host_seconds: Counter[str] = Counter()

    def add(self, name: str, num_bytes: int) -> None:
        self.calls[name] += 1
        self.bytes[name] += num_bytes

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.calls), Counter(self.bytes)

    def since(self, snapshot) -> tuple[Counter[str], Counter[str]]:
        calls, num_bytes = snapshot
        return self.calls - calls, self.bytes - num_bytes

    def add_all(self, delta) -> None:
        self.calls.update(delta[0])
        self.bytes.update(delta[1])

    def remove(self, delta) -> None:
        self.calls.subtract(delta[0])
        self.bytes.subtract(delta[1])


TOTALS = CollectiveTotals()


def _record(name: str, x: torch.Tensor) -> None:
    TOTALS.add(name, x.numel() * x.element_size())
    for counts in _active_counters:
        counts[name] += 1


def tp_all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """x <- sum of x over the TP ranks, in place."""
    if ctx.tp_size == 1:
        return x
    _record("all_reduce", x)
    started = time.perf_counter()
    dist.all_reduce(x, group=ctx.tp_group)
    if x.device.type == "cpu":
        TOTALS.host_seconds["all_reduce"] += time.perf_counter() - started
    return x


def tp_all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """[..., n, ...] per rank -> [..., n * tp_size, ...], rank order along `dim`."""
    if ctx.tp_size == 1:
        return x
    x = x.contiguous()
    _record("all_gather", x)
    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    started = time.perf_counter()
    dist.all_gather(parts, x, group=ctx.tp_group)
    if x.device.type == "cpu":
        TOTALS.host_seconds["all_gather"] += time.perf_counter() - started
    return torch.cat(parts, dim=dim)

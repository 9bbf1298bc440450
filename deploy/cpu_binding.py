"""Which CPUs each process of a local mesh runs on, when its workers compute on the CPU.

A CPU worker's step is the device's work: it runs fastest on CPUs nothing else of the mesh is
scheduled on, as vLLM's CPU backend binds its workers and keeps a core for its API server. So
when the machine has a CPU to spare beyond the workers' threads, each worker gets CPUs of its
own (its --num-threads of them, from the highest-numbered down) and the gateways and schedulers
share the rest. The plan travels to each process as MESHSERVE_CPU_AFFINITY, a Linux CPU list
(`1`, `0-3,8`), which `meshserve gateway|scheduler|worker` applies (bind_from_env) before the
process starts any thread; set it yourself to bind a process started by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV = "MESHSERVE_CPU_AFFINITY"


def parse_cpu_list(text: str) -> set[int]:
    """`0-3,8` -> {0, 1, 2, 3, 8}; ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, _, last = part.partition("-")
        last = last or first
        if not first.isdigit() or not last.isdigit() or int(last) < int(first):
            raise ValueError(f"{ENV}={text!r}: not a CPU list such as 1 or 0-3,8")
        cpus.update(range(int(first), int(last) + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 3, 8} -> `0-3,8`."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class CpuPlan:
    workers: tuple[frozenset[int], ...]  # by worker index (replica, then stage, then rank)
    rest: frozenset[int]  # gateways, schedulers

    def describe(self) -> str:
        return (f"workers on CPUs {', '.join(format_cpu_list(set(w)) for w in self.workers)}; "
                f"gateways and schedulers on {format_cpu_list(set(self.rest))}")


def plan_cpus(num_workers: int, threads_per_worker: int, available: set[int]) -> CpuPlan | None:
    """Each worker's CPUs and the rest's, or None when the workers' threads leave no CPU over."""
    if num_workers * threads_per_worker >= len(available):
        return None
    free = sorted(available, reverse=True)
    workers = []
    for _ in range(num_workers):
        workers.append(frozenset(free[:threads_per_worker]))
        free = free[threads_per_worker:]
    return CpuPlan(tuple(workers), frozenset(free))


def workers_on_cpu(worker_args: tuple[str, ...]) -> bool:
    """Whether the workers will compute on the CPU: --device cpu, or auto on a machine with no
    NVIDIA driver loaded (without importing torch, which the launcher does not need)."""
    device = _flag(worker_args, "--device", "auto")
    if device != "auto":
        return device == "cpu"
    return not Path("/proc/driver/nvidia").exists()


def threads_per_worker(worker_args: tuple[str, ...]) -> int:
    return int(_flag(worker_args, "--num-threads", "1"))


def _flag(args: tuple[str, ...], name: str, default: str) -> str:
    """The value after flag `name` in args, or default."""
    args = list(args)
    return args[args.index(name) + 1] if name in args[:-1] else default


def bind_from_env() -> None:
    """Runs this process (and every thread it starts from now on) on the CPUs that
    MESHSERVE_CPU_AFFINITY lists, if it is set."""
    text = os.environ.get(ENV, "")
    if text:
        os.sched_setaffinity(0, parse_cpu_list(text))

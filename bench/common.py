"""What the benchmarks share: the machine they ran on, their common flags, their pictures."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores ({cpu}), {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bind_threads(cpus: set[int]) -> set[int]:
    """Every thread of this process onto cpus (threads started later inherit the caller's);
    returns the CPUs the calling thread had."""
    before = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    return before


# gRPC channel options for a TCP connection of the channel's own: channels to one address share
# one connection otherwise (grpc's global subchannel pool), and gateway processes sharing a port
# get connections, not streams, from the kernel.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def served_model(http_address: str) -> str:
    """The model id a gateway's OpenAI HTTP door (host:port) serves."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{http_address}/v1/models") as models:
        return json.load(models)["data"][0]["id"]


async def completion_events(session, model: str, prompt_ids: list[int], max_tokens: int):
    """The server-sent events (parsed) of a streamed /v1/completions request of exactly
    max_tokens greedy tokens, its usage in a last chunk, on an aiohttp session: what the
    benchmarks' HTTP clients send and read."""
    import json

    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
    async with session.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


INFLIGHT = 3  # plans in flight in the in-process loop, as the scheduler keeps at PP = 1


def drive(runner, num_blocks: int, prompts: list[list[int]], max_tokens: int,
          sampling=None, max_num_batched_tokens: int = 8192, through_wire: bool = False
          ) -> tuple[list[float], dict[int, list[int]]]:
    """Serves prompts to the end on a worker's model runner in this process, with the real
    scheduler, INFLIGHT plans in flight as the worker runs them (through_wire: each plan
    through its protobuf form, as a worker receives it); returns the host time of every
    result and the ids each sequence got."""
    from collections import deque

    from services.scheduler.block_manager import BlockManager
    from services.scheduler.scheduler import Scheduler, SchedulerConfig
    from services.scheduler.sequence import RequestParams, Sequence
    from services.step import SamplingOptions, StepPlan

    runner.reset()
    sched = Scheduler(SchedulerConfig(max_num_seqs=len(prompts),
                                      max_num_batched_tokens=max_num_batched_tokens),
                      BlockManager(num_blocks, runner.block_size))
    params = RequestParams(max_tokens, sampling or SamplingOptions(), ignore_eos=True)
    for i, p in enumerate(prompts):
        sched.add(Sequence(i, str(i), list(p), params))
    outputs = {i: [] for i in range(len(prompts))}
    times, inflight = [], deque()
    while sched.has_work or inflight:
        while len(inflight) < INFLIGHT and (plan := sched.schedule()) is not None:
            if through_wire:
                plan = StepPlan.from_pb(plan.to_pb())
            inflight.append((plan, runner.launch(plan)))
        plan, pending = inflight.popleft()
        ids = pending.token_ids()
        times.append(time.perf_counter())
        for update in sched.on_result(plan, {s: [t] for s, t in zip(pending.seq_ids, ids)}):
            outputs[update.seq.seq_id] += update.new_token_ids
    return times, outputs


def add_stream_flags(p: argparse.ArgumentParser) -> None:
    """--model, --num-requests, --max-tokens, --concurrency of the streaming benchmarks."""
    p.add_argument("--model", default="", help="default: the tiny test model")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")


def figure(num_plots: int, size: tuple[float, float]):
    """(pyplot, figure, its axes) for a PNG (matplotlib, the `bench` extra; no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, num_plots, figsize=size)
    return plt, fig, axes


def save_figure(fig, axes, title: str, path: Path) -> None:
    """Grids and legends on every axis, the title, into path (its folder made)."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)

"""Time one worker's decode step (the model runner alone, no gRPC) and show where it goes.

    python bench/profile_step.py [--model DIR] [--batch 16] [--context 64] [--steps 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from services.model import (ModelConfig, ParallelContext, allocate_kv_caches,  # noqa: E402
                            ensure_default_model, load_model)
from services.worker.plan import SamplingOptions, ScheduledSeq, StepPlan  # noqa: E402
from services.worker.runner import ModelRunner  # noqa: E402

BLOCK = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = Path(a.model) if a.model else ensure_default_model()
    config = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, ParallelContext(), None, dtype=dtype, device=device)
    per_seq = -(-(a.context + a.steps + 8) // BLOCK)
    caches = allocate_kv_caches(config, model.ctx, config.num_hidden_layers, per_seq * a.batch,
                                BLOCK, dtype, device)
    runner = ModelRunner(model, caches, BLOCK, device, True, True, model.ctx)
    tables = [tuple(range(i * per_seq, (i + 1) * per_seq)) for i in range(a.batch)]
    greedy = SamplingOptions()
    runner.execute(StepPlan(0, tuple(ScheduledSeq(i, tuple(range(3, 3 + a.context)), 0, tables[i],
                                                   True, greedy) for i in range(a.batch))))

    def decode(step: int) -> StepPlan:
        return StepPlan(step, tuple(ScheduledSeq(i, (), a.context + step - 1, tables[i], True,
                                                 greedy, True) for i in range(a.batch)))

    for step in range(1, 4):
        runner.execute(decode(step))
    start = time.perf_counter()
    for step in range(4, 4 + a.steps):
        runner.execute(decode(step))
    ms = (time.perf_counter() - start) / a.steps * 1e3
    print(f"{model_dir.name} on {device} ({dtype}): decode step, batch {a.batch}, context "
          f"{a.context}: {ms:.2f} ms ({a.batch / ms * 1e3:.0f} tokens/s)")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for step in range(4 + a.steps, 14 + a.steps):
                runner.execute(decode(step))
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by=key, row_limit=12))


if __name__ == "__main__":
    main()

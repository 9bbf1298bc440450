"""What the mesh adds to a step: the real Redis, scheduler, gateways and streaming clients
driving a stand-in worker whose device takes a fixed time per step (bench/paced_worker.py).

    python bench/bench_mesh.py [--step-ms 1.2] [--batches 1,16,64] [--api-servers 1,4]
                               [--tokens 256] [--py-spy PATH]

With a GPU worker the served inter-token latency can only match the step when the scheduler,
the gateways and the clients do their per-step work in less than a step; here the step is
exact, so the served ITL over the step time is the mesh's own overhead, measured on any
machine (the CPU of the host is what decides it). Per process it also prints the CPU time per
step, read from /proc. Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_decode import profile_mesh, served_stats  # noqa: E402
from bench.common import cpu_seconds, machine  # noqa: E402
from deploy.launcher import Child, LocalMesh, MeshSpec  # noqa: E402
from services.model.cache import default_model_dir  # noqa: E402
from services.model.default_model import ensure_default_model  # noqa: E402


@dataclass
class PacedMesh(LocalMesh):
    """A LocalMesh whose replicas run bench/paced_worker.py instead of model workers."""

    step_ms: float = 1.2

    def start_replica(self, replica_id: str, timeout_s: float = 120.0) -> list[Child]:
        name = f"{replica_id}-worker-pp0-tp0"
        ready = self.log_dir / f"{name}.address"
        worker = Child(name, spawn_paced_worker(self.spec.model, self.step_ms, ready,
                                                self.log_dir / f"{name}.log"),
                       self.log_dir / f"{name}.log")
        self.children.append(worker)
        self.worker_addresses[replica_id] = [self._await_address(worker, timeout_s)]
        return [worker, self.start_scheduler(replica_id)]


def spawn_paced_worker(model: str, step_ms: float, ready: Path, log: Path) -> subprocess.Popen:
    """bench/paced_worker.py in its own process; it writes its address to `ready`."""
    ready.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "protos"),
                                           os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.paced_worker", "--model", model,
             "--served-model-name", Path(model).name, "--step-ms", str(step_ms),
             "--ready-file", str(ready)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def prompts(batch: int) -> list[list[int]]:
    return [[1] + [(7 * i + j) % 200 + 3 for j in range(16)] for i in range(batch)]


def run(model: str, step_ms: float, batches: list[int], api_servers: int, tokens: int,
        py_spy: str) -> list[dict]:
    spec = MeshSpec(model=model, port=0, http_port=-1, api_server_count=api_servers,
                    scheduler_args=("--max-num-seqs", str(max(batches)),
                                    "--max-num-batched-tokens", "8192"),
                    cpu_bind="off")  # its worker is a stand-in, not a CPU model worker
    mesh = PacedMesh(spec, step_ms=step_ms)
    mesh.start()
    rows = []
    try:
        served_stats(mesh.gateway_address, prompts(4), 8)  # every process warmed up
        for batch in batches:
            before = {}  # CPU so far, once the streams start (the clients start 6 s ahead)
            itl, tpot, rate = served_stats(
                mesh.gateway_address, prompts(batch), tokens,
                at_start=lambda: before.update({c.name: cpu_seconds(c.proc.pid)
                                                for c in mesh.children}))
            cpu = {c.name: cpu_seconds(c.proc.pid) - before[c.name] for c in mesh.children}
            steps = tokens  # every stream runs the same decode steps, together
            rows.append(dict(batch=batch, itl=itl, tpot=tpot, rate=rate,
                             cpu_ms_per_step={k: v * 1e3 / steps for k, v in cpu.items()}))
            print(f"  step {step_ms} ms, {api_servers} gateway(s), batch {batch}: ITL {itl:.3f} "
                  f"ms ({itl / step_ms:.2f}x the step), TPOT {tpot:.3f} ms, {rate:.0f} tokens/s; "
                  f"CPU ms per step: " + ", ".join(
                      f"{k} {v:.3f}" for k, v in rows[-1]["cpu_ms_per_step"].items()), flush=True)
        if py_spy:
            profile_mesh(mesh, py_spy, prompts(max(batches)), 900)
    finally:
        mesh.stop()
    return rows


def engine_alone(model: str, step_ms: float, batch: int, steps: int = 600) -> tuple[float, float]:
    """(wall ms, CPU ms) per step of a scheduler's step loop in this process, driving one paced
    worker with `batch` decodes, its outputs dropped: the scheduler's own share, no gateway."""
    import asyncio

    from services.scheduler.sequence import RequestParams, Sequence
    from services.scheduler.server import SchedulerSettings, build_engine
    from services.scheduler.workers import WorkerGroup
    from services.step import SamplingOptions

    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "worker.address"
        proc = spawn_paced_worker(model, step_ms, ready, Path(tmp) / "worker.log")
        try:
            while not ready.exists():
                assert proc.poll() is None, (Path(tmp) / "worker.log").read_text()
                time.sleep(0.05)
            address = ready.read_text()

            async def loop() -> tuple[float, float]:
                workers = WorkerGroup([address])
                shape = await workers.describe()
                engine = build_engine(SchedulerSettings(workers=(address,), redis_url="",
                                                        max_num_seqs=max(batch, 1)),
                                      shape, workers)
                running = asyncio.create_task(engine.run())
                for i in range(batch):
                    engine.submit(Sequence(i + 1, f"r{i}", [1] + [5 + i % 100] * 16,
                                           RequestParams(steps + 200, SamplingOptions(), True),
                                           b""), lambda out: None)
                while engine.num_steps < 50:  # past the prefills
                    await asyncio.sleep(0.01)
                first, cpu, wall = engine.num_steps, time.process_time(), time.perf_counter()
                while engine.num_steps < first + steps:
                    await asyncio.sleep(0.01)
                n = engine.num_steps - first
                result = ((time.perf_counter() - wall) * 1e3 / n,
                          (time.process_time() - cpu) * 1e3 / n)
                running.cancel()
                await workers.close()
                return result

            return asyncio.run(loop())
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="the gateway's tokenizer and the vocab "
                   "(default: the tiny test model)")
    p.add_argument("--step-ms", default="1.2", help="device step times, e.g. 1.2,5")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--api-servers", default="1,4")
    p.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    p.add_argument("--py-spy", default="", help="py-spy binary: profile one more run")
    p.add_argument("--engine-rounds", type=int, default=3, help="rounds of the scheduler's "
                   "step loop alone in this process at the largest batch (0 = none)")
    a = p.parse_args()
    model = a.model or str(default_model_dir() if default_model_dir().is_dir()
                           else ensure_default_model())
    batches = [int(b) for b in a.batches.split(",")]
    print(machine(), flush=True)
    table = []
    for step_ms in [float(s) for s in a.step_ms.split(",")]:
        for count in [int(c) for c in a.api_servers.split(",")]:
            for row in run(model, step_ms, batches, count, a.tokens, a.py_spy):
                table.append((step_ms, count, row))
    alone = {step_ms: [engine_alone(model, step_ms, max(batches))
                       for _ in range(a.engine_rounds)]
             for step_ms in [float(x) for x in a.step_ms.split(",")] if a.engine_rounds}
    names = sorted({k for _, _, r in table for k in r["cpu_ms_per_step"]})
    print(f"\n### The mesh over a paced worker (`python bench/bench_mesh.py`)\n\n"
          f"Machine: {machine()}\n")
    head = ["step ms", "gateways", "batch", "served ITL ms", "ITL / step", "TPOT ms",
            "tokens/s", *(f"{n} CPU ms/step" for n in names)]
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    for step_ms, count, r in table:
        cpu = [f"{r['cpu_ms_per_step'].get(n, 0):.3f}" for n in names]
        print(f"| {step_ms} | {count} | {r['batch']} | {r['itl']:.3f} | {r['itl'] / step_ms:.2f} "
              f"| {r['tpot']:.3f} | {r['rate']:.0f} | " + " | ".join(cpu) + " |")
    for step_ms, rounds in alone.items():
        print(f"\nThe scheduler's step loop alone in process (its engine driving the paced worker, "
              f"{max(batches)} decodes, outputs dropped), step {step_ms} ms, per round: "
              + ", ".join(f"{wall:.3f} ms per step, {cpu:.3f} ms CPU" for wall, cpu in rounds))


if __name__ == "__main__":
    main()

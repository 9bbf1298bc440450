"""A stand-in worker for measuring the mesh itself: it answers Describe and serves the step
stream as a worker does (services/step/link.py), holds no model, and answers each plan as a
device of a fixed step time would.

    python -m bench.paced_worker --model DIR --served-model-name NAME --step-ms 1.2 --ready-file F

Each plan is queued on a virtual device the moment it arrives: it ends `--step-ms` after the
step before it ended, or after it arrived if the device was idle, and its result (one id per
sampled sequence, never an EOS) is sent then. So the scheduler, the gateways and the clients
run exactly as they run against a GPU worker whose step takes that long, and whatever they add
to the inter-token latency beyond the step is theirs: the device idles whenever a plan comes
late. Only `bench/bench_mesh.py` runs it; it is not part of the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import threading
import time

import grpc

from meshserve.internal.v1 import worker_pb2 as pb
from meshserve.internal.v1 import worker_pb2_grpc as pb_grpc
from services.grpc_standard import SERVER_KEEPALIVE_OPTIONS
from services.model.config import ModelConfig
from services.process import announce, run_service
from services.step import link


class PacedWorker(pb_grpc.WorkerServicer):
    def __init__(self, config: ModelConfig, name: str, step_s: float, num_kv_blocks: int,
                 max_num_seqs: int):
        self.config, self.name, self.step_s = config, name, step_s
        self.num_kv_blocks, self.max_num_seqs = num_kv_blocks, max_num_seqs
        self.idle_s = 0.0  # device time spent waiting for a plan, while a stream was open
        self.steps = 0
        self.step_port = 0

    async def Describe(self, request, context) -> pb.DescribeResponse:
        c = self.config
        return pb.DescribeResponse(model=self.name, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                                   num_kv_blocks=self.num_kv_blocks, block_size=16,
                                   max_model_len=c.max_position_embeddings,
                                   eos_token_ids=c.eos_token_ids, vocab_size=c.vocab_size,
                                   max_num_seqs=self.max_num_seqs, step_port=self.step_port)

    async def step_stream(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        link.tune(writer)
        try:
            await link.accept(reader)
        except (link.NotAStepStream, link.StepLinkClosed):
            writer.close()
            return
        # The results leave from a thread that sleeps to each one's time: the event loop's own
        # timers round up to whole milliseconds, as long as the step itself.
        loop, due = asyncio.get_running_loop(), queue.SimpleQueue()
        sender = threading.Thread(target=self._send_when_due, args=(loop, writer, due),
                                  daemon=True)
        sender.start()
        try:
            await self._pace(reader, due)
        finally:
            due.put(None)
            await asyncio.to_thread(sender.join)
            writer.close()

    @staticmethod
    def _send_when_due(loop, writer, due: queue.SimpleQueue) -> None:
        while (item := due.get()) is not None:
            done_at, result = item
            time.sleep(max(0.0, done_at - time.perf_counter()))
            loop.call_soon_threadsafe(link.write_frame, writer, link.RESULT,
                                      result.SerializeToString())

    async def _pace(self, reader: asyncio.StreamReader, due: queue.SimpleQueue) -> None:
        device_free_at = time.perf_counter()  # when the device ends its last queued step
        first_token = 3 + (self.config.bos_token_id or 0)
        eos = set(self.config.eos_token_ids)
        try:
            while True:
                _, payload = await link.read_frame(reader)
                plan = pb.StepPlan.FromString(payload)
                now = time.perf_counter()
                if self.steps and now > device_free_at:
                    self.idle_s += now - device_free_at
                device_free_at = max(now, device_free_at) + self.step_s
                self.steps += 1
                sampled = [s for s, sample in zip(plan.seq_ids, plan.sample) if sample]
                ids = [(first_token + plan.step_id + s) % self.config.vocab_size for s in sampled]
                ids = [i if i not in eos else first_token for i in ids]
                due.put((device_free_at, pb.StepResult(
                    step_id=plan.step_id, micro_batch=plan.micro_batch, seq_ids=sampled,
                    token_ids=ids, step_time_us=int(self.step_s * 1e6))))
        except link.StepLinkClosed:
            pass

    async def idle_report(self) -> None:
        """Prints, every 5 s with steps, how long the device idled waiting for plans (its log)."""
        last_steps, last_idle = 0, 0.0
        while True:
            await asyncio.sleep(5.0)
            if self.steps > last_steps:
                print(f"paced worker: {self.steps - last_steps} steps, device idle "
                      f"{(self.idle_s - last_idle) * 1e3:.0f} ms", flush=True)
            last_steps, last_idle = self.steps, self.idle_s


async def serve(args, stop: asyncio.Event) -> None:
    config = ModelConfig.from_dir(args.model)
    worker = PacedWorker(config, args.served_model_name, args.step_ms / 1e3, args.num_kv_blocks,
                         args.max_num_seqs)
    server = grpc.aio.server(options=SERVER_KEEPALIVE_OPTIONS)  # the scheduler pings
    pb_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    steps = await asyncio.start_server(worker.step_stream, "127.0.0.1", 0)
    worker.step_port = steps.sockets[0].getsockname()[1]
    await server.start()
    announce(args.ready_file, "127.0.0.1", port)
    report = asyncio.create_task(worker.idle_report())
    await stop.wait()
    report.cancel()
    steps.close()
    await server.stop(grace=0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder: its config sets the vocab")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--step-ms", type=float, default=1.2)
    p.add_argument("--num-kv-blocks", type=int, default=65536)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--ready-file", default="")
    args = p.parse_args()
    run_service(lambda stop: serve(args, stop))


if __name__ == "__main__":
    main()

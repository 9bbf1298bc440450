"""The worker service: one process, one TP shard of one PP stage.

    meshserve worker --model DIR --tp-rank R --tp-size T --pp-rank S --pp-size P \
                     --dist-init tcp://HOST:PORT --port N

Plans arrive on the step stream (services/step/link.py: frames on one TCP connection from
the scheduler, at the port Describe names); on a GPU, and at every pipeline stage, the model
step runs on its own thread so the event loop keeps receiving plans and moving activations over
the stage link while a step computes; on a CPU without stages it runs on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from meshserve.internal.v1 import worker_pb2 as pb
from meshserve.internal.v1 import worker_pb2_grpc as pb_grpc
from services import metrics as m
from services.model import comm
from services.grpc_standard import SERVER_KEEPALIVE_OPTIONS, add_health, set_health
from services.metrics import serve_metrics
from services.process import announce, run_service
from services.progress import Progress
from services.step import StepPlan, StepResult, link
from services.worker.settings import WorkerSettings
from services.worker.runner import PendingStep
from services.worker.shard import WorkerShard

log = logging.getLogger("meshserve.worker")


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, shard: WorkerShard):
        self.shard = shard
        # The model thread: every step and collective, in plan order. The current CUDA
        # device is per thread, so it is set there once. On a CPU the device is the CPU this
        # event loop runs on: a model thread buys no overlap there (the GIL serializes the
        # step's Python with the loop's) and costs a GIL handoff and a wake-up per step, so the
        # model's work runs on the loop itself (None; bench/RESULTS.md, 2026-12-07). Pipeline
        # stages keep the thread: their stage links move activations while a step computes.
        init = (torch.cuda.set_device, (shard.device,)) if shard.device.type == "cuda" else (
            None, ())
        self._thread = None if shard.device.type == "cpu" and shard.ctx.pp_size == 1 else (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="model",
                               initializer=init[0], initargs=init[1]))
        # Waits for launched steps' ids to reach the host, in order, off the model thread.
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="results")
        self._busy = asyncio.Lock()
        self.metrics = WorkerMetrics(shard)
        self.step_port = 0  # where serve_steps listens, once it does

    async def serve_steps(self, host: str, port: int) -> asyncio.Server:
        """Listens for the scheduler's step stream on host:port (0: any free port)."""
        server = await asyncio.start_server(self._step_stream, host, port)
        self.step_port = server.sockets[0].getsockname()[1]
        return server

    async def wait_idle(self, timeout_s: float) -> None:
        """Until no scheduler's step stream is open (a draining scheduler closes it when its
        last request ends), for timeout_s at most."""
        deadline = time.monotonic() + timeout_s
        while self._busy.locked() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def on_model_thread(self, fn, *args):
        """fn(*args) where the model's work runs, one call at a time, in call order."""
        if self._thread is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def Describe(self, request, context) -> pb.DescribeResponse:
        described = self.shard.describe()
        described.step_port = self.step_port
        return described

    async def ConnectStage(self, request, context) -> pb.ConnectStageResponse:
        await self.shard.connect_next_stage(request.next_stage_address)
        return pb.ConnectStageResponse()

    async def _step_stream(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """One scheduler's step stream: its plans in, in order; this worker's results out (the
        sampling worker's), or the error that ended it. The stream's end is the scheduler's:
        a scheduler closes it only when it leaves, so whatever it still has in flight here is
        dropped then (a step waiting on a stage that is gone too), and the next one is served."""
        link.tune(writer)
        try:
            try:
                await link.accept(reader)
            except link.NotAStepStream as exc:  # a probe, a stray client: it takes nothing here
                log.warning("step port: refused %s: %s", writer.get_extra_info("peername"), exc)
                link.write_frame(writer, link.ERROR, str(exc).encode())
                return
            except link.StepLinkClosed:
                return  # connected and left (a TCP probe)
            if self._busy.locked():
                link.write_frame(writer, link.ERROR,
                                 b"this worker already serves a scheduler's step stream")
                return
            async with self._busy:
                # A new stream is a new scheduler: nothing of the last one's sequences holds.
                await self.on_model_thread(self.shard.runner.reset)
                if self.shard.proposer is not None:
                    await self.on_model_thread(self.shard.proposer.reset)
                plans: asyncio.Queue = asyncio.Queue()
                stepper = asyncio.create_task(self._answer(plans, writer))
                try:
                    await _read_plans(reader, plans)  # until the scheduler goes
                finally:
                    stepper.cancel()
                    await asyncio.gather(stepper, return_exceptions=True)
        finally:
            writer.close()

    async def _answer(self, plans: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        """Runs the stream's plans and writes their results; a failed step's error ends it."""
        try:
            async for result in self._steps(plans):
                link.write_frame(writer, link.RESULT, result.to_pb().SerializeToString())
                await writer.drain()  # at once, unless the scheduler stopped reading
        except ConnectionError:
            pass  # the scheduler went away: nothing to tell it
        except Exception as exc:  # a failed step: the scheduler fails its replica with this
            log.exception("step failed")
            link.write_frame(writer, link.ERROR, str(exc).encode())
            writer.close()

    async def _steps(self, plans: asyncio.Queue):
        """Launches each plan as soon as it comes and streams the results in plan order. The
        launches and the waits for results run apart, so a plan that arrives while the device
        still computes the step before is queued behind it at once: the device does not idle
        on the host, and a result is not held up by the next plan's launch."""
        finished: asyncio.Queue = asyncio.Queue()  # result futures in plan order
        launcher = asyncio.create_task(self._launch_all(plans, finished))
        try:
            while True:
                if isinstance(item := await finished.get(), BaseException):
                    raise item
                if (result := await item) is not None:
                    yield result
        finally:
            launcher.cancel()

    async def _launch_all(self, plans: asyncio.Queue, finished: asyncio.Queue) -> None:
        try:
            while True:
                plan = StepPlan.from_pb(await plans.get())
                launched = await self._launch(plan)
                finished.put_nowait(asyncio.ensure_future(self._finish(plan, launched)))
        except Exception as exc:  # the result stream fails with it
            finished.put_nowait(exc)

    async def _launch(self, plan: StepPlan) -> PendingStep:
        shard = self.shard
        hidden = await shard.receive_activations(plan) if not shard.is_first_stage else None
        launched = await self.on_model_thread(shard.runner.launch, plan, hidden)
        self.metrics.steps[launched.graph_replay] += 1
        if not shard.is_last_stage:
            await shard.send_activations(plan, launched.hidden)
        return launched

    async def _finish(self, plan: StepPlan, launched: PendingStep) -> StepResult | None:
        """The step's result once its ids are on the host (waited for off the model thread)."""
        if not self.shard.is_sampler:
            return None
        if launched.on_host:  # a CPU step: its ids are there, no thread to wait on
            ids, counts = launched.results()
        else:
            ids, counts = await asyncio.get_running_loop().run_in_executor(self._waiter,
                                                                           launched.results)
        elapsed_us = launched.elapsed_us()
        self.metrics.step_time.observe(elapsed_us / 1e6)
        result = StepResult(plan.step_id, tuple(launched.seq_ids), tuple(ids), plan.micro_batch,
                            num_token_ids=counts, step_time_us=elapsed_us)
        if self.shard.proposer is None:
            return result
        proposals, num_proposals = await self.on_model_thread(  # for the sequences' next steps
            self.shard.proposer.propose, plan, result.tokens_by_seq())
        return dataclasses.replace(result, proposal_ids=tuple(proposals),
                                   num_proposal_ids=tuple(num_proposals))


class WorkerMetrics:
    """Steps by how they ran (a CUDA-graph replay or eager) and, on the sampling rank, their
    time from launch to ids on the host."""

    def __init__(self, shard: WorkerShard):
        self.shard = shard
        s = shard.settings
        self.labels = {"model_name": shard.describe().model, "tp_rank": str(s.tp_rank),
                       "pp_rank": str(s.pp_rank)}
        self.steps = {True: 0, False: 0}  # graph replay -> count
        self._histograms: list = []
        self.step_time = m.histogram(self._histograms, "worker_step_time_seconds",
                                     "Steps on this worker, launch to sampled ids on the host.",
                                     self.labels, m.STEP_TIME_BUCKETS)
        m.register_collector(self)

    def collect(self):
        family = m.CounterMetricFamily(m.PREFIX + "worker_steps",
                                       "Steps run, by CUDA-graph replay or eager.",
                                       labels=[*self.labels, "mode"])
        for graph, count in self.steps.items():
            family.add_metric([*self.labels.values(), "graph" if graph else "eager"], count)
        yield family
        for histogram in self._histograms:
            yield from histogram.collect()
        names, values = list(self.labels), list(self.labels.values())
        for what, doc, counts in (
                ("tp_collectives", "TP collectives issued (CUDA-graph replays included).",
                 comm.TOTALS.calls),
                ("tp_collective_bytes", "Bytes this rank's TP collectives carried.",
                 comm.TOTALS.bytes),
                ("tp_collective_seconds", "Wall time of the TP collectives on CPUs (gloo); "
                 "on GPUs they run inside the step (see step time).", comm.TOTALS.host_seconds)):
            family = m.CounterMetricFamily(m.PREFIX + what, doc, labels=[*names, "op"])
            for op in ("all_reduce", "all_gather"):
                family.add_metric([*values, op], counts.get(op, 0))
            yield family
        family = m.GaugeMetricFamily(m.PREFIX + "worker_memory_bytes",
                                     "Bytes this rank holds: weights, KV cache, CUDA graphs.",
                                     labels=[*names, "kind"])
        for kind, value in self.shard.memory.items():
            family.add_metric([*values, kind], value)
        yield family
        link = self.shard.link_stats
        for what, doc, value in (
                ("stage_link_sent_bytes", "Activation bytes sent to the next stage.",
                 link.sent_bytes),
                ("stage_link_send_seconds", "Time in stage-link sends.", link.send_s),
                ("stage_link_received_bytes", "Activation bytes from the previous stage.",
                 link.received_bytes),
                ("stage_link_receive_wait_seconds",
                 "Time awaiting the previous stage's activations (its compute included).",
                 link.receive_wait_s)):
            yield m.counter(what, doc, self.labels, value)


async def _read_plans(reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
    """The stream's plans into queue, until the stream ends (or brings what is not a plan)."""
    try:
        while (frame := await link.read_frame(reader))[0] == link.PLAN:
            queue.put_nowait(pb.StepPlan.FromString(frame[1]))
        log.warning("a step frame of kind %d where plans come: closing the step stream", frame[0])
    except link.StepLinkClosed:
        pass


async def serve(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    # Joining the TP group blocks until every rank has come: keep the loop free meanwhile.
    shard = await loop.run_in_executor(None, WorkerShard.load, settings)
    await shard.start_stage_link()
    servicer = WorkerServicer(shard)
    await servicer.on_model_thread(shard.capture_graphs, _capture_progress(shard))
    server = grpc.aio.server(options=[*SERVER_KEEPALIVE_OPTIONS,
                                      ("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    service_names = [pb.DESCRIPTOR.services_by_name["Worker"].full_name]
    health = await add_health(server, service_names)  # the model is loaded: it serves
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    steps = await servicer.serve_steps(settings.host, settings.step_port)
    await server.start()
    log.info("worker tp=%d/%d pp=%d/%d on %s:%d, steps on port %d (%s, %d KV blocks)",
             settings.tp_rank, settings.tp_size, settings.pp_rank, settings.pp_size,
             settings.host, port, servicer.step_port, shard.device, shard.num_kv_blocks)
    if settings.metrics_port >= 0:
        metrics_port = serve_metrics(settings.metrics_port, settings.host)
        announce(settings.ready_file and settings.ready_file + ".metrics", settings.host,
                 metrics_port)
    announce(settings.ready_file, settings.host, port)
    stop = stop or asyncio.Event()
    await stop.wait()
    await set_health(health, ["", *service_names], False)  # leaving, once its scheduler has
    await servicer.wait_idle(settings.drain_timeout_s)
    await health.enter_graceful_shutdown()
    steps.close()
    await server.stop(grace=1.0)
    await shard.close()


def _capture_progress(shard: WorkerShard):
    graphs = shard.runner.graphs
    if graphs is None:
        return None
    bar = Progress("capturing CUDA graphs", len(graphs.keys), "graphs", log)

    def progress(bucket) -> None:
        bar.update()
        if bar.done == len(graphs.keys):
            bar.close()
    return progress


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings.from_args(argv)
    torch.set_num_threads(settings.num_threads)
    run_service(lambda stop: serve(settings, stop))

"""The scheduler service of one replica: gRPC for the gateway, streams to the workers,
heartbeats and prefix-index updates to Redis.

    meshserve scheduler --workers host:port[,host:port...] --redis-url URL [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import logging
import random
import time
import uuid
from dataclasses import dataclass

import grpc

from meshserve.internal.v1 import scheduler_pb2 as pb
from meshserve.internal.v1 import scheduler_pb2_grpc as pb_grpc
from meshserve.v1 import generation_pb2 as public_pb
from services.arg_types import NON_NEGATIVE, PORT, POSITIVE, SECONDS, int_at_least
from services.grpc_standard import add_health, set_health
from services.messages import shown
from services.metrics import serve_metrics
from services.process import announce, run_service
from services.registry import Registry, ReplicaRecord
from services.registry.block_hash import extra_key
from services.scheduler.block_manager import BlockManager
from services.scheduler.engine import Engine, Output
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.scheduler import Scheduler, SchedulerConfig
from services.scheduler.sequence import FinishReason, RequestParams, Sequence
from services.scheduler.speculative import SpeculativeConfig
from services.scheduler.workers import ReplicaShape, WorkerGroup, WorkerGroupError
from services.step import SamplingOptions

log = logging.getLogger("meshserve.scheduler")

REPLICA_FAILED = "the replica's workers failed; retry elsewhere"

FINISH_TO_PB = {
    FinishReason.LENGTH: public_pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: public_pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: public_pb.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True)
class SchedulerSettings:
    workers: tuple[str, ...]
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    advertise_host: str = ""  # the address the gateway dials; default: host
    replica_id: str = ""
    model_name: str = ""  # default: the workers' model name
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    heartbeat_ttl_s: float = 5.0
    max_inflight_steps: int = 0  # 0 = max(PP + 1, 3): see build_engine
    seed: int | None = None  # seeds the draws of requests that bring no seed of their own
    drain_timeout_s: float = 60.0  # a stopping replica finishes its requests for this long
    metrics_port: int = -1  # Prometheus /metrics on this port; 0 = any free port; -1 = none
    ready_file: str = ""  # host:port written here once registered (+ ".metrics": that port)
    disable_log_stats: bool = False  # no step and request histograms
    speculative: SpeculativeConfig | None = None  # --speculative-config; None = off

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> SchedulerSettings:
        p = argparse.ArgumentParser(prog="meshserve scheduler", description=__doc__.splitlines()[0])
        p.add_argument("--workers", required=True,
                       help="comma-separated host:port of every worker of this replica")
        p.add_argument("--redis-url", required=True)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on")
        p.add_argument("--port", type=PORT, default=0)
        p.add_argument("--advertise-host", default="", help="address the gateway should dial")
        p.add_argument("--replica-id", default="")
        p.add_argument("--served-model-name", "--model-name", dest="model_name", default="",
                       help="the name clients ask for (default: the model folder's name)")
        p.add_argument("--max-num-seqs", type=POSITIVE, default=64)
        p.add_argument("--max-num-batched-tokens", type=POSITIVE, default=512)
        p.add_argument("--no-chunked-prefill", action="store_true")
        p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True, help="reuse cached prompt blocks (on by default)")
        p.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                       action="store_false", help=argparse.SUPPRESS)
        p.add_argument("--heartbeat-ttl", type=SECONDS, default=5.0)
        p.add_argument("--max-inflight-steps", type=NON_NEGATIVE, default=0,
                       help="plans in flight at once (0 = pipeline stages + 1, at least 3)")
        p.add_argument("--seed", type=int, default=None,
                       help="seed for requests without one: the same requests in the same "
                            "order sample the same tokens again (default: fresh each start)")
        p.add_argument("--drain-timeout", type=SECONDS, default=60.0,
                       help="seconds a replica told to stop (SIGTERM, meshserve drain) keeps "
                            "serving the requests it has, taking no new ones; the rest then "
                            "fail over")
        p.add_argument("--metrics-port", type=int_at_least(-1), default=-1,
                       help="Prometheus /metrics on this port (0 = any free port, -1 = none)")
        p.add_argument("--ready-file", default="", help="write host:port here once serving")
        p.add_argument("--disable-log-stats", action="store_true",
                       help="no metrics (vLLM's flag)")
        p.add_argument("--speculative-config", default="",
                       help='speculative decoding, JSON as vLLM spells it: {"method": "ngram", '
                            '"num_speculative_tokens": K, "prompt_lookup_max": N, '
                            '"prompt_lookup_min": M} (greedy requests; default: off)')
        a = p.parse_args(argv)
        try:
            speculative = SpeculativeConfig.parse(a.speculative_config)
        except ValueError as exc:
            p.error(str(exc))
        return cls(tuple(w for w in a.workers.split(",") if w), a.redis_url, a.host, a.port,
                   a.advertise_host, a.replica_id, a.model_name, a.max_num_seqs,
                   a.max_num_batched_tokens, not a.no_chunked_prefill, a.enable_prefix_caching,
                   a.heartbeat_ttl, a.max_inflight_steps, a.seed, a.drain_timeout,
                   a.metrics_port, a.ready_file, a.disable_log_stats, speculative)


class SchedulerServicer(pb_grpc.SchedulerServicer):
    """Converts protobuf to scheduler types at the edge; streams each request's tokens."""

    def __init__(self, engine: Engine, shape: ReplicaShape, model_name: str, replica_id: str,
                 seed: int | None = None):
        self.engine = engine
        self.shape = shape
        self.model_name = model_name
        self.replica_id = replica_id
        self._seq_ids = itertools.count(1)
        self._by_request: dict[str, int] = {}
        self._seeds = random.Random(seed)  # seed None: from the OS
        self.draining = asyncio.Event()  # set: no new requests, finish those held
        self._outboxes: set[_Outbox] = set()  # one per open SubmitMany call

    async def Submit(self, request: pb.SubmitRequest, context):
        seq = self._to_sequence(request)
        if (refusal := self._refusal(seq)) is not None:
            await context.abort(*refusal)
        self._by_request[seq.request_id] = seq.seq_id
        queue: asyncio.Queue[Output] = asyncio.Queue()
        self.engine.submit(seq, queue.put_nowait)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                tokens = list(out.token_ids)
                while out.finish_reason is None and not queue.empty():
                    out = queue.get_nowait()  # coalesce what piled up since the last send
                    tokens += out.token_ids
                finished = out.finish_reason is not None
                if out.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, REPLICA_FAILED)
                yield pb.SubmitResponse(token_ids=tokens,
                                        finish_reason=FINISH_TO_PB.get(out.finish_reason, 0),
                                        num_cached_prompt_tokens=out.num_cached_prompt_tokens)
        finally:
            self._by_request.pop(seq.request_id, None)
            if not finished:  # the caller went away: free its blocks now
                self.engine.cancel(seq.seq_id)

    async def SubmitMany(self, request_iterator, context):
        """Requests in, and per wake-up one message with every request's news: all the
        outputs one step delivers leave together."""
        outbox = _Outbox()
        self._outboxes.add(outbox)
        live: dict[int, Sequence] = {}  # stream id -> its sequence
        reader = asyncio.create_task(self._read_many(request_iterator, outbox, live))
        try:
            while True:
                if (news := await outbox.take()) is not None:
                    yield news
                if reader.done() and not reader.cancelled() and reader.exception() is not None:
                    raise reader.exception()
                # The gateway half-closed, or this replica drained: end once its requests have.
                if (reader.done() or self.draining.is_set()) and not live and outbox.empty():
                    return
        finally:
            self._outboxes.discard(outbox)
            reader.cancel()
            for seq in live.values():  # the gateway went away: free everything it had here
                self._by_request.pop(seq.request_id, None)
                self.engine.cancel(seq.seq_id)

    async def _read_many(self, request_iterator, outbox: _Outbox, live: dict) -> None:
        try:
            await self._read_many_until_closed(request_iterator, outbox, live)
        finally:
            outbox.wake()  # SubmitMany sees the end

    async def _read_many_until_closed(self, request_iterator, outbox: _Outbox, live: dict):
        async for msg in request_iterator:
            if msg.cancel:
                if (seq := live.pop(msg.stream_id, None)) is not None:
                    self._by_request.pop(seq.request_id, None)
                    self.engine.cancel(seq.seq_id)
                continue
            seq = self._to_sequence(msg.submit)
            if (refusal := self._refusal(seq)) is not None:
                code, message = refusal
                outbox.put(pb.RequestOutput(stream_id=msg.stream_id, error_code=code.value[0],
                                            error_message=message))
                continue
            try:
                self.engine.submit(seq, functools.partial(self._to_outbox, outbox, live,
                                                          msg.stream_id))
            except WorkerGroupError:
                outbox.put(pb.RequestOutput(stream_id=msg.stream_id, error_message=REPLICA_FAILED,
                                            error_code=grpc.StatusCode.UNAVAILABLE.value[0]))
                continue
            live[msg.stream_id] = seq
            self._by_request[seq.request_id] = seq.seq_id

    def _to_outbox(self, outbox: _Outbox, live: dict, stream_id: int, out: Output) -> None:
        if out.finish_reason is None:
            if stream_id in outbox.started:  # the common case: a step's new ids, in columns
                outbox.put_ids(stream_id, out.token_ids)
                return
            outbox.started.add(stream_id)  # its first ids go with the prefix-cache count
        else:
            outbox.started.discard(stream_id)
            seq = live.pop(stream_id, None)
            if seq is not None:
                self._by_request.pop(seq.request_id, None)
        if out.finish_reason is FinishReason.ERROR:
            outbox.put(pb.RequestOutput(stream_id=stream_id, error_message=REPLICA_FAILED,
                                        error_code=grpc.StatusCode.UNAVAILABLE.value[0]))
            return
        outbox.put(pb.RequestOutput(stream_id=stream_id, response=pb.SubmitResponse(
            token_ids=out.token_ids, finish_reason=FINISH_TO_PB.get(out.finish_reason, 0),
            num_cached_prompt_tokens=out.num_cached_prompt_tokens)))

    def _to_sequence(self, request: pb.SubmitRequest) -> Sequence:
        s = request.sampling
        seed = s.seed if s.HasField("seed") else self._seeds.getrandbits(63)  # one for all ranks
        options = SamplingOptions(s.temperature, s.top_p or 1.0, s.top_k, seed)
        params = RequestParams(s.max_tokens, options, s.ignore_eos)
        return Sequence(next(self._seq_ids), request.request_id or uuid.uuid4().hex,
                        list(request.prompt_token_ids), params,
                        extra_key(self.model_name, request.cache_salt))

    def _refusal(self, seq: Sequence) -> tuple[grpc.StatusCode, str] | None:
        """Why seq cannot run here (status code, what to do), or None."""
        if self.draining.is_set():  # the gateway sends it elsewhere
            return grpc.StatusCode.UNAVAILABLE, f"replica {self.replica_id} is draining"
        total = len(seq.prompt_ids) + seq.params.max_tokens
        if seq.request_id in self._by_request:
            return (grpc.StatusCode.ALREADY_EXISTS,
                    f"request {shown(seq.request_id)} is already running here")
        if not seq.prompt_ids or seq.params.max_tokens < 1:
            return grpc.StatusCode.INVALID_ARGUMENT, "need a non-empty prompt and max_tokens >= 1"
        if total > self.shape.max_model_len:
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt ({len(seq.prompt_ids)}) + max_tokens ({seq.params.max_tokens}) "
                    f"exceeds the context of {self.shape.max_model_len} tokens")
        blocks_needed = -(-total // self.shape.block_size)
        if blocks_needed > self.shape.num_kv_blocks:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request needs {blocks_needed} KV blocks; this replica has "
                    f"{self.shape.num_kv_blocks}")
        return None

    def end_streams(self) -> None:
        """After a drain: each SubmitMany call ends with OK once its requests have (the
        gateways' links close cleanly instead of being cancelled at shutdown)."""
        for outbox in self._outboxes:
            outbox.wake()

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        seq_id = self._by_request.get(request.request_id)
        return pb.CancelResponse(found=seq_id is not None and self.engine.cancel(seq_id))

    async def GetStats(self, request, context) -> pb.ReplicaStats:
        sched = self.engine.scheduler
        return pb.ReplicaStats(
            replica_id=self.replica_id, num_running=len(sched.running),
            num_waiting=len(sched.waiting), num_kv_blocks=self.shape.num_kv_blocks,
            num_free_kv_blocks=sched.blocks.num_free_blocks,
            max_batch_size_seen=sched.max_batch_size_seen, num_steps=self.engine.num_steps,
            num_preemptions=sched.num_preemptions, block_size=self.shape.block_size,
            num_prefix_hit_tokens=sched.num_prefix_hit_tokens)


class _Outbox:
    """News waiting for the next SubmitMany message; take() waits until there is some. A
    request's plain new ids go in columns (put_ids), its first and last outputs and failures as
    RequestOutputs (put): the reader takes the outputs that end nothing, then the columns, then
    the rest, which is the order they were put in for any one request."""

    def __init__(self) -> None:
        self.started: set[int] = set()  # stream ids whose first output has gone
        self._ready = asyncio.Event()
        self._clear()

    def _clear(self) -> None:
        self._outputs: list[pb.RequestOutput] = []
        self._stream_ids: list[int] = []
        self._counts: list[int] = []
        self._ids: list[int] = []

    def put(self, output: pb.RequestOutput) -> None:
        self._outputs.append(output)
        self._ready.set()

    def put_ids(self, stream_id: int, token_ids: list[int]) -> None:
        self._stream_ids.append(stream_id)
        self._counts.append(len(token_ids))
        self._ids += token_ids
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    def empty(self) -> bool:
        return not self._outputs and not self._stream_ids

    async def take(self) -> pb.SubmitManyResponse | None:
        """Everything queued as one message, once there is something (None: woken for
        nothing)."""
        await self._ready.wait()
        self._ready.clear()
        if self.empty():
            return None
        news = pb.SubmitManyResponse(outputs=self._outputs, stream_ids=self._stream_ids,
                                     num_token_ids=self._counts, token_ids=self._ids)
        self._clear()
        return news


def build_engine(settings: SchedulerSettings, shape: ReplicaShape, workers: WorkerGroup) -> Engine:
    # PP = P: one micro-batch per stage, plus one queued. PP = 1: two plans wait at the workers
    # while they run one, so a step's result can take two step times to come back and be
    # planned on before the device runs dry (a 1 ms GPU step is shorter than that round trip's
    # worst case).
    inflight = settings.max_inflight_steps or max(shape.pp_size + 1, 3)
    config = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_chunked_prefill=settings.enable_chunked_prefill,
        workers_keep_last_token=shape.pp_size == 1,
        eos_token_ids=shape.eos_token_ids,
        num_micro_batches=min(shape.pp_size, inflight),
        max_live_seqs=shape.max_live_seqs,
        speculative=settings.speculative)
    blocks = BlockManager(shape.num_kv_blocks, shape.block_size, settings.enable_prefix_caching)
    return Engine(Scheduler(config, blocks), workers, max_inflight_steps=inflight)


PREFIX_PUBLISH_S = 0.2  # new and evicted blocks reach the index this often (when there are any)


async def heartbeat_loop(registry: Registry, servicer: SchedulerServicer, record: ReplicaRecord,
                         period_s: float, resync: asyncio.Event) -> None:
    """Keeps the replica's record and prefix set alive. A record that had expired (Redis
    restarted, or this process stalled) had lost its prefix set too: `resync` asks
    prefix_publish_loop to write it whole again."""
    sched = servicer.engine.scheduler
    blocks = sched.blocks
    last_tokens, last_time = sched.num_generation_tokens, time.monotonic()
    while True:
        now = time.monotonic()
        throughput = (sched.num_generation_tokens - last_tokens) / max(1e-6, now - last_time)
        last_tokens, last_time = sched.num_generation_tokens, now
        record = dataclasses.replace(record, num_free_kv_blocks=blocks.num_free_blocks,
                                     num_running=len(sched.running),
                                     num_waiting=len(sched.waiting),
                                     draining=servicer.draining.is_set(),
                                     num_prefix_query_tokens=sched.num_prefix_query_tokens,
                                     num_prefix_hit_tokens=sched.num_prefix_hit_tokens,
                                     generation_throughput=round(throughput, 1))
        try:
            beat = await registry.heartbeat(record)
            if not beat.was_live:
                resync.set()
            if beat.drain_requested and not servicer.draining.is_set():
                log.info("replica %s: drain requested", record.replica_id)
                servicer.draining.set()
        except Exception as exc:  # Redis hiccup: try again next period
            log.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(period_s)


async def prefix_publish_loop(registry: Registry, blocks, replica_id: str, resync: asyncio.Event,
                              period_s: float = PREFIX_PUBLISH_S) -> None:
    """Publishes the prefix cache's changes every period_s (a few hundred ms: a gateway that did
    not route a prompt itself learns where its blocks went before the next heartbeat), all
    writes of the set from this one task, in order. When the set must be rewritten (resync, or
    a batch whose fate is unknown because its write failed), it is replaced whole from the
    cache's own state, so a lost batch leaves neither a missing nor a stale block behind."""
    while True:
        try:
            if resync.is_set():
                blocks.drain_events()  # the whole set below includes them
                resync.clear()
                await registry.replace_prefix(replica_id, blocks.cached_hashes())
            else:
                added, removed = blocks.drain_events()
                if added or removed:
                    await registry.publish_prefix(replica_id, added, removed)
        except Exception as exc:  # Redis hiccup: rewrite the whole set once it is back
            log.warning("prefix index update failed: %s", exc)
            resync.set()
        await asyncio.sleep(period_s)


async def drain(servicer: SchedulerServicer, registry: Registry, replica_id: str,
                timeout_s: float) -> None:
    """Takes no new requests (gateways see `draining` in the registry at once and route
    elsewhere; one that was already on its way is refused with UNAVAILABLE and resumed
    elsewhere before any token) and finishes the requests it has, for timeout_s at most."""
    servicer.draining.set()
    try:
        await registry.set_draining(replica_id, True)
    except Exception as exc:  # Redis away: the refusals send requests elsewhere all the same
        log.warning("could not mark replica %s draining: %s", replica_id, exc)
    engine = servicer.engine
    log.info("replica %s draining: %d requests to finish (at most %.0f s)", replica_id,
             len(engine.scheduler.seqs), timeout_s)
    deadline = time.monotonic() + timeout_s
    while engine.scheduler.seqs and engine.failure is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine.scheduler.seqs:
        log.warning("replica %s: %d requests left at the drain timeout; they fail over",
                    replica_id, len(engine.scheduler.seqs))
    servicer.end_streams()


async def serve(settings: SchedulerSettings, stop: asyncio.Event | None = None) -> None:
    workers = WorkerGroup(list(settings.workers))
    shape = await workers.describe()
    model_name = settings.model_name or shape.model
    replica_id = settings.replica_id or f"replica-{uuid.uuid4().hex[:8]}"
    engine = build_engine(settings, shape, workers)
    servicer = SchedulerServicer(engine, shape, model_name, replica_id, settings.seed)
    server = grpc.aio.server()
    pb_grpc.add_SchedulerServicer_to_server(servicer, server)
    service_names = [pb.DESCRIPTOR.services_by_name["Scheduler"].full_name]
    health = await add_health(server, service_names, serving=False)  # until it is registered
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    address = f"{settings.advertise_host or settings.host}:{port}"
    log.info("replica %s serving %s (tp=%d pp=%d, %d KV blocks) at %s", replica_id, model_name,
             shape.tp_size, shape.pp_size, shape.num_kv_blocks, address)
    registry = Registry(settings.redis_url, ttl_s=settings.heartbeat_ttl_s)
    record = ReplicaRecord(replica_id, address, model_name, shape.tp_size, shape.pp_size,
                           shape.block_size, shape.num_kv_blocks, shape.num_kv_blocks, 0, 0,
                           started_at=time.time(), max_model_len=shape.max_model_len)
    await registry.register(record)
    await set_health(health, ["", *service_names], True)
    if not settings.disable_log_stats:
        engine.metrics = SchedulerMetrics(engine, model_name, replica_id)
    if settings.metrics_port >= 0:
        metrics_port = serve_metrics(settings.metrics_port, settings.host)
        announce(settings.ready_file and settings.ready_file + ".metrics", settings.host,
                 metrics_port)
    announce(settings.ready_file, settings.host, port)
    resync = asyncio.Event()
    publisher = asyncio.create_task(prefix_publish_loop(registry, engine.scheduler.blocks,
                                                        replica_id, resync))
    tasks = [asyncio.create_task(engine.run()),
             asyncio.create_task(heartbeat_loop(registry, servicer, record,
                                                settings.heartbeat_ttl_s / 3, resync)),
             publisher]
    stop = stop or asyncio.Event()
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(servicer.draining.wait())]
    await asyncio.wait([*tasks, *waiters], return_when=asyncio.FIRST_COMPLETED)
    if not any(task.done() for task in tasks):  # told to stop, not failed: drain first
        await set_health(health, ["", *service_names], False)  # not ready: it is leaving
        await drain(servicer, registry, replica_id, settings.drain_timeout_s)
    await health.enter_graceful_shutdown()
    publisher.cancel()  # no write of the prefix set after it is deleted
    await registry.deregister(replica_id)
    await registry.close()
    await server.stop(grace=1.0)
    for task in [*tasks, *waiters]:
        task.cancel()
    await workers.close()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception():
            raise task.exception()


def main(argv: list[str] | None = None) -> None:
    settings = SchedulerSettings.from_args(argv)
    run_service(lambda stop: serve(settings, stop))

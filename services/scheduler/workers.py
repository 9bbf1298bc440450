"""The scheduler's side of the worker API: Describe over gRPC, then one long-lived step
stream per worker (services/step/link.py).

Every worker of the replica (all TP ranks of all PP stages) receives every plan; only the
sampling worker (TP rank 0 of the last stage) streams results back. A worker that fails
breaks the replica: the step loop then raises WorkerGroupError, even while idle.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import grpc

from meshserve.internal.v1 import worker_pb2 as pb
from meshserve.internal.v1 import worker_pb2_grpc as pb_grpc
from services.grpc_standard import CLIENT_KEEPALIVE_OPTIONS
from services.step import StepPlan, StepResult, link

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
                   ("grpc.max_receive_message_length", 64 << 20),
                   *CLIENT_KEEPALIVE_OPTIONS]


class WorkerGroupError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReplicaShape:
    """What the workers reported, checked for agreement."""

    model: str
    tp_size: int
    pp_size: int
    num_kv_blocks: int  # the smallest of all workers
    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    max_live_seqs: int = 0  # sequences the workers can hold at once (0 = no limit)


class WorkerGroup:
    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self.epoch = random.getrandbits(63) or 1  # tells this scheduler's activations apart
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self._stubs = [pb_grpc.WorkerStub(c) for c in self._channels]
        self._writers: list[asyncio.StreamWriter] = []
        # serialized StepResults, and the replica's failure (a WorkerGroupError) should it fail
        self._results: asyncio.Queue[bytes | WorkerGroupError] = asyncio.Queue()
        self._watchers: list[asyncio.Task] = []
        self._failure: asyncio.Future | None = None

    async def describe(self, timeout_s: float = 120.0) -> ReplicaShape:
        """Waits for every worker to answer Describe, then joins their stage links."""
        infos = await asyncio.gather(*(self._describe_one(s, timeout_s) for s in self._stubs))
        shape = _check_shape(infos)
        await self._connect_stages(infos)
        await self._open_streams(infos)
        return shape

    async def _describe_one(self, stub, timeout_s: float) -> pb.DescribeResponse:
        return await stub.Describe(pb.DescribeRequest(), wait_for_ready=True, timeout=timeout_s)

    async def _connect_stages(self, infos: list[pb.DescribeResponse]) -> None:
        by_place = {(i.pp_rank, i.tp_rank): stub for i, stub in zip(infos, self._stubs)}
        calls = []
        for info, stub in zip(infos, self._stubs):
            nxt = next((i for i in infos
                        if i.pp_rank == info.pp_rank + 1 and i.tp_rank == info.tp_rank), None)
            if nxt is not None:
                req = pb.ConnectStageRequest(next_stage_address=nxt.stage_link_address)
                calls.append(by_place[(info.pp_rank, info.tp_rank)].ConnectStage(req, timeout=60))
        await asyncio.gather(*calls)

    async def _open_streams(self, infos: list[pb.DescribeResponse]) -> None:
        self._failure = asyncio.get_running_loop().create_future()
        for info, addr in zip(infos, self.addresses):
            host = addr.rsplit(":", 1)[0].strip("[]")  # the host Describe reached
            try:
                reader, writer = await link.connect(host, info.step_port)
            except (OSError, asyncio.TimeoutError) as exc:
                raise WorkerGroupError(f"worker {addr}: no step stream on port "
                                       f"{info.step_port}: {exc}") from exc
            self._writers.append(writer)
            is_sampler = info.pp_rank == info.pp_size - 1 and info.tp_rank == 0
            self._watchers.append(asyncio.create_task(self._watch(reader, addr, is_sampler)))

    async def _watch(self, reader: asyncio.StreamReader, addr: str, is_sampler: bool) -> None:
        """Reads a worker's stream: the sampler's results, or (from any worker) its failure.
        Every stream is watched all the time, so a worker that dies while the replica is idle
        is noticed at once, not at the next step."""
        try:
            while True:
                kind, payload = await link.read_frame(reader)
                if kind == link.ERROR:
                    message = payload.decode(errors="replace")
                    err = WorkerGroupError(f"worker {addr} failed: {message}")
                    break
                if is_sampler:
                    self._results.put_nowait(payload)
        except link.StepLinkClosed as exc:
            err = WorkerGroupError(f"worker {addr} failed: {exc}")
        if not self._failure.done():
            self._failure.set_exception(err)
            self._results.put_nowait(err)  # a step loop waiting for a result sees it too

    def send(self, plan: StepPlan) -> None:
        """Queues plan for every worker; each connection sends it off this call, in order."""
        msg = plan.to_pb()
        msg.epoch = self.epoch
        payload = msg.SerializeToString()
        for writer in self._writers:
            link.write_frame(writer, link.PLAN, payload)

    async def next_result(self) -> StepResult:
        """The sampling worker's next result, in plan order."""
        payload = await self._results.get()  # no task per step: a failure comes this way too
        if isinstance(payload, WorkerGroupError):
            self._results.put_nowait(payload)  # and stays for every later call
            raise payload
        return StepResult.from_pb(pb.StepResult.FromString(payload))

    async def wait(self, event: asyncio.Event) -> None:
        """Waits for event, or raises WorkerGroupError if a worker fails first."""
        await self._unless_failed(event.wait())

    async def _unless_failed(self, awaitable):
        task = asyncio.ensure_future(awaitable)
        await asyncio.wait({task, self._failure}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            self._failure.result()  # raises the worker's failure
        return task.result()

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        for writer in self._writers:
            writer.close()
        for channel in self._channels:
            await channel.close()


def _check_shape(infos: list[pb.DescribeResponse]) -> ReplicaShape:
    first = infos[0]
    places = sorted((i.pp_rank, i.tp_rank) for i in infos)
    expected = [(p, t) for p in range(first.pp_size) for t in range(first.tp_size)]
    if places != expected:
        raise WorkerGroupError(f"workers report places {places}, expected {expected} "
                               f"for tp={first.tp_size} pp={first.pp_size}")
    if len({(i.model, i.block_size) for i in infos}) != 1:
        raise WorkerGroupError("workers disagree on model or block size")
    return ReplicaShape(first.model, first.tp_size, first.pp_size,
                        min(i.num_kv_blocks for i in infos), first.block_size,
                        first.max_model_len, tuple(first.eos_token_ids), first.vocab_size,
                        min(i.max_num_seqs for i in infos))

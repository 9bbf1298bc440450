"""One SubmitMany stream from this gateway to a replica's scheduler, shared by every request
the gateway sends there: the scheduler answers each step with one message for all of them.

    request A ─┐                         ┌─ SubmitManyResponse(stream_ids=[A, B, …], token_ids=…)
    request B ─┼─► SubmitManyRequest ───►│   one message per scheduler wake-up
    request C ─┘   (submit / cancel)     └─► demultiplexed into each request's queue

The stream opens with the first request and opens again after it breaks; when it breaks,
every request on it fails with the stream's status, and the gateway resumes them elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc

from meshserve.internal.v1 import scheduler_pb2 as pb
from meshserve.internal.v1 import scheduler_pb2_grpc


class ReplicaError(Exception):
    """A request failed at (or on the way to) a replica; code() and details() as grpc's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ReplicaLink:
    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub):
        self.stub = stub
        self._stream_ids = itertools.count(1)
        self._requests: asyncio.Queue | None = None
        self._outputs: dict[int, asyncio.Queue] = {}  # stream id -> that request's queue
        self._reader: asyncio.Task | None = None

    async def submit(self, request: pb.SubmitRequest
                     ) -> AsyncIterator[pb.SubmitResponse | NewIds]:
        """The request's responses as Submit would stream them (token_ids, finish_reason,
        num_cached_prompt_tokens); raises ReplicaError."""
        self._open()
        stream_id, queue = next(self._stream_ids), asyncio.Queue()
        self._outputs[stream_id] = queue
        self._requests.put_nowait(pb.SubmitManyRequest(stream_id=stream_id, submit=request))
        finished, pending = False, None
        try:
            while not finished:
                item = pending if pending is not None else await queue.get()
                pending = None
                if isinstance(item, ReplicaError):
                    finished = True
                    raise item
                # A consumer that fell behind (a busy gateway, a slow client) takes every response
                # already here as one: fewer messages per token under load, none held back when
                # it keeps up.
                ready = [item]
                while ready[-1].finish_reason == 0 and not queue.empty():
                    if isinstance(nxt := queue.get_nowait(), ReplicaError):
                        pending = nxt
                        break
                    ready.append(nxt)
                item = _merged(ready) if len(ready) > 1 else item
                finished = item.finish_reason != 0
                yield item
        finally:
            if self._outputs.pop(stream_id, None) is not None and not finished:
                self._requests.put_nowait(pb.SubmitManyRequest(stream_id=stream_id, cancel=True))

    def _open(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        self._requests = asyncio.Queue()
        call = self.stub.SubmitMany(_drain(self._requests))
        self._reader = asyncio.create_task(self._read(call))

    async def _read(self, call) -> None:
        error = ReplicaError(grpc.StatusCode.UNAVAILABLE, "the scheduler closed the stream")
        try:
            async for msg in call:
                # In the order the scheduler put them (SubmitManyResponse in scheduler.proto):
                # outputs that end nothing, the columns of new ids, the outputs that end.
                starting, ending = [], []
                for out in msg.outputs:
                    (ending if out.error_code or out.response.finish_reason else starting
                     ).append(out)
                for out in starting:
                    self._deliver(out)
                if msg.stream_ids:
                    self._deliver_columns(msg)
                for out in ending:
                    self._deliver(out)
        except grpc.aio.AioRpcError as exc:
            error = ReplicaError(exc.code(), exc.details() or "replica stream failed")
        finally:  # every request still on the stream fails with it
            outputs, self._outputs = self._outputs, {}
            for queue in outputs.values():
                queue.put_nowait(error)

    def _deliver(self, out: pb.RequestOutput) -> None:
        queue = self._outputs.get(out.stream_id)
        if queue is None:
            return  # cancelled here meanwhile
        if out.error_code:
            self._outputs.pop(out.stream_id)
            queue.put_nowait(ReplicaError(_CODES[out.error_code], out.error_message))
        else:
            queue.put_nowait(out.response)

    def _deliver_columns(self, msg: pb.SubmitManyResponse) -> None:
        """Each request's plain new ids of the message, to its queue."""
        ids, end, outputs = list(msg.token_ids), 0, self._outputs
        for stream_id, count in zip(msg.stream_ids, msg.num_token_ids):
            start, end = end, end + count
            if (queue := outputs.get(stream_id)) is not None:
                queue.put_nowait(NewIds(ids[start:end]))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


class NewIds(NamedTuple):
    """A request's news as a SubmitResponse holds it: what the columns of a SubmitManyResponse
    deliver (new ids only), and merged responses."""

    token_ids: list[int]
    finish_reason: int = 0
    num_cached_prompt_tokens: int = 0


def _merged(responses: list[pb.SubmitResponse | NewIds]) -> NewIds:
    """Consecutive responses of one request as the one the scheduler would have sent."""
    return NewIds([i for r in responses for i in r.token_ids], responses[-1].finish_reason,
                  next((r.num_cached_prompt_tokens for r in responses
                        if r.num_cached_prompt_tokens), 0))


async def _drain(queue: asyncio.Queue):
    while True:
        yield await queue.get()

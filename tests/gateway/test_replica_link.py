"""The gateway's shared stream to a scheduler over real gRPC on loopback: a request that fell
behind takes every response already there as one, and a failure after tokens still reaches it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.replica_link import ReplicaError, ReplicaLink
from meshserve.internal.v1 import scheduler_pb2 as pb
from meshserve.internal.v1 import scheduler_pb2_grpc
from meshserve.v1 import generation_pb2 as public

NUM_TOKENS = 6


class Scheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers each submit with NUM_TOKENS one-token messages at once; with fail=True the last
    one is an error instead of the finish. With whole=True, all of them in one message as the
    scheduler packs several steps: the first and last as outputs, those between in columns
    (listed before the first in the message, which is read outputs-ending-nothing first)."""

    def __init__(self, fail: bool, whole: bool = False):
        self.fail, self.whole = fail, whole

    async def SubmitMany(self, request_iterator, context):
        async for req in request_iterator:
            if not req.HasField("submit"):
                continue
            if self.whole:
                last = pb.RequestOutput(stream_id=req.stream_id)
                last.response.token_ids.append(100 + NUM_TOKENS - 1)
                last.response.finish_reason = public.FINISH_REASON_LENGTH
                first = pb.RequestOutput(stream_id=req.stream_id)
                first.response.token_ids.append(100)
                first.response.num_cached_prompt_tokens = 16
                middle = [100 + i for i in range(1, NUM_TOKENS - 1)]
                yield pb.SubmitManyResponse(outputs=[last, first],
                                            stream_ids=[req.stream_id] * len(middle),
                                            num_token_ids=[1] * len(middle), token_ids=middle)
                continue
            for i in range(NUM_TOKENS):
                last = i == NUM_TOKENS - 1
                out = pb.RequestOutput(stream_id=req.stream_id)
                if last and self.fail:
                    out.error_code, out.error_message = grpc.StatusCode.UNAVAILABLE.value[0], "gone"
                else:
                    out.response.token_ids.append(100 + i)
                    out.response.finish_reason = public.FINISH_REASON_LENGTH if last else 0
                    out.response.num_cached_prompt_tokens = 16 if i == 0 else 0
                yield pb.SubmitManyResponse(outputs=[out])


async def lagging_client(fail: bool, whole: bool = False
                         ) -> tuple[list[list[int]], list, str | None]:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(Scheduler(fail, whole), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    link = ReplicaLink(scheduler_pb2_grpc.SchedulerStub(channel))
    messages, error = [], None
    try:
        responses = link.submit(pb.SubmitRequest(prompt_token_ids=[1, 2, 3]))
        messages.append(await responses.__anext__())
        await asyncio.sleep(0.5)  # behind: every other response arrives meanwhile
        async for msg in responses:
            messages.append(msg)
    except ReplicaError as exc:
        error = exc.details()
    finally:
        await link.close()
        await channel.close()
        await server.stop(None)
    return [list(m.token_ids) for m in messages], messages, error


def test_a_request_behind_takes_the_waiting_responses_as_one():
    ids, messages, error = asyncio.run(lagging_client(fail=False))
    assert error is None
    assert [i for chunk in ids for i in chunk] == [100 + i for i in range(NUM_TOKENS)]
    # the first, then the rest merged into one (or all in the first, had they all arrived)
    assert len(messages) <= 2
    assert messages[-1].finish_reason == public.FINISH_REASON_LENGTH
    assert messages[0].num_cached_prompt_tokens == 16


def test_a_failure_behind_the_waiting_tokens_still_fails_the_request():
    ids, messages, error = asyncio.run(lagging_client(fail=True))
    assert error == "gone"
    assert [i for chunk in ids for i in chunk] == [100 + i for i in range(NUM_TOKENS - 1)]
    assert all(m.finish_reason == 0 for m in messages)


def test_steps_packed_in_one_message_reach_the_request_in_their_order():
    ids, messages, error = asyncio.run(lagging_client(fail=False, whole=True))
    assert error is None
    assert [i for chunk in ids for i in chunk] == [100 + i for i in range(NUM_TOKENS)]
    assert messages[0].num_cached_prompt_tokens == 16
    assert messages[-1].finish_reason == public.FINISH_REASON_LENGTH

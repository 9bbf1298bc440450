"""The scheduler's SubmitMany stream, as the gateway uses it: many requests on one call, their
tokens batched per step, refusals and cancels per request, a closed call cancelling the rest."""

from __future__ import annotations

import asyncio
import time

import grpc

from meshserve.internal.v1 import scheduler_pb2 as spb
from meshserve.internal.v1 import scheduler_pb2_grpc
from meshserve.v1 import generation_pb2 as pb
from tests.integration.conftest import NUM_KV_BLOCKS, hf_greedy, replica_addresses, scheduler_stats

PROMPTS = {1: [1, 17, 29, 33], 2: [1, 200, 201, 7, 9], 3: [1, 5, 6]}


def submit(stream_id: int, ids, max_tokens: int) -> spb.SubmitManyRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return spb.SubmitManyRequest(stream_id=stream_id, submit=spb.SubmitRequest(
        request_id=f"many-{stream_id}-{time.monotonic_ns()}", prompt_token_ids=ids,
        sampling=sampling))


async def run_many(address: str, requests, until_finished: set[int]):
    """Sends requests on one call; returns (ids per stream, errors per stream, the streams with
    news in each message, the stream of each id in its columns)."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)

    async def outgoing():
        while True:
            yield await queue.get()

    ids, errors, messages, columns = {}, {}, [], []
    async with grpc.aio.insecure_channel(address) as channel:
        call = scheduler_pb2_grpc.SchedulerStub(channel).SubmitMany(outgoing())
        pending = set(until_finished)
        async for msg in call:
            messages.append([stream_id for stream_id, *_ in news_of(msg)])
            columns.append([stream_id for stream_id, count in
                            zip(msg.stream_ids, msg.num_token_ids) for _ in range(count)])
            for stream_id, new_ids, finish_reason, error in news_of(msg):
                if error:
                    errors[stream_id] = error
                    pending.discard(stream_id)
                    continue
                ids.setdefault(stream_id, []).extend(new_ids)
                if finish_reason:
                    pending.discard(stream_id)
            if not pending:
                break
        call.cancel()
    return ids, errors, messages, columns


def news_of(msg: spb.SubmitManyResponse):
    """(stream id, new ids, finish reason, (error code, message) or None) per request's news,
    in the order the message is read: outputs that end nothing, the columns, the others."""
    def ends(out):
        return out.error_code or out.response.finish_reason

    def item(out):
        error = (out.error_code, out.error_message) if out.error_code else None
        return out.stream_id, list(out.response.token_ids), out.response.finish_reason, error

    items = [item(out) for out in msg.outputs if not ends(out)]
    ids, end = list(msg.token_ids), 0
    for stream_id, count in zip(msg.stream_ids, msg.num_token_ids, strict=True):
        items.append((stream_id, ids[end:end + count], 0, None))
        end += count
    assert end == len(ids)
    return items + [item(out) for out in msg.outputs if ends(out)]


def test_requests_share_one_call_and_their_tokens_travel_together(mesh, default_model_dir):
    address = replica_addresses(mesh.redis_url)["replica-0"]
    requests = [submit(i, p, 12) for i, p in PROMPTS.items()]
    requests.append(submit(9, [], 4))  # refused: empty prompt
    ids, errors, messages, columns = asyncio.run(run_many(address, requests, {1, 2, 3, 9}))
    assert ids == {i: hf_greedy(default_model_dir, p, 12, stop_at_eos=False)
                   for i, p in PROMPTS.items()}
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors == {9: (invalid, "need a non-empty prompt and max_tokens >= 1")}
    # Decode steps of the three run together: most messages carry all three requests.
    assert sum(len(set(m)) == 3 for m in messages) >= 6
    # Every id between a request's first (with its prefix-cache count) and its last (with the
    # finish reason) travels in the columns: 10 of each request's 12.
    assert sum(len(ids) for ids in columns) == 3 * 10
    assert sum(len(set(ids)) > 1 for ids in columns) >= 3  # shared by requests


def test_closing_the_call_cancels_its_requests_and_frees_their_blocks(mesh):
    address = replica_addresses(mesh.redis_url)["replica-0"]

    async def leave_early():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(submit(1, PROMPTS[1], 400))
        queue.put_nowait(submit(2, PROMPTS[2], 400))

        async def outgoing():
            while True:
                yield await queue.get()

        async with grpc.aio.insecure_channel(address) as channel:
            call = scheduler_pb2_grpc.SchedulerStub(channel).SubmitMany(outgoing())
            got = 0
            async for msg in call:
                got += sum(len(new_ids) for _, new_ids, _, _ in news_of(msg))
                if got >= 10:  # both are running (each has up to 400 tokens to go)
                    break
            call.cancel()

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while scheduler_stats(mesh).num_free_kv_blocks != NUM_KV_BLOCKS:
        assert time.monotonic() < deadline, "blocks of a closed SubmitMany call were not freed"
        time.sleep(0.05)
    assert scheduler_stats(mesh).num_running == 0

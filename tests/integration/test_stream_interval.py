"""--stream-interval: a gateway that gathers tokens into fewer streamed responses sends the same
tokens and text as one that sends each as it comes, the first token at once and the end at once,
over gRPC and over the OpenAI HTTP API."""

from __future__ import annotations

import openai

from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import extra_gateway

PROMPT = "The capital of France is"


def stream(stub, max_tokens: int, stop=()):
    request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, stop=list(stop)))
    return list(stub.Generate(request))


def test_tokens_gather_into_messages_of_the_interval(mesh, stub, tmp_path):
    each = stream(stub, 10)  # the mesh's own gateway: interval 1 (steps merge when read late)
    with extra_gateway(mesh, tmp_path, "--stream-interval", "4", "--http-port", "0") as channel:
        gathered = stream(pb_grpc.GenerationStub(channel), 10)
        # the first response at once, then at least four ids in each (more where the gateway
        # read several steps of the stream late), and what is left at the end: 4 at most for
        # 10 ids (tests/gateway/test_held_back.py pins each step of it)
        sizes = [len(r.token_ids) for r in gathered]
        assert all(n >= 4 for n in sizes[1:-1]) and len(sizes) <= 4, sizes
        assert [i for r in gathered for i in r.token_ids] == [i for r in each for i in r.token_ids]
        assert "".join(r.text for r in gathered) == "".join(r.text for r in each)
        assert gathered[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert gathered[-1].usage.completion_tokens == 10
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in gathered[:-1])

        http = (tmp_path / "gateway.address.http").read_text()
        client = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0)
        chunks = list(client.completions.create(model=client.models.list().data[0].id,
                                                prompt=PROMPT, max_tokens=10, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(
            r.text for r in each)
        assert len([c for c in chunks if c.choices]) <= 4  # as over gRPC


def test_a_stop_string_inside_a_gathered_message_ends_it_there(mesh, stub, tmp_path):
    each = stream(stub, 12)
    text = "".join(r.text for r in each)
    stop = text[len(text) // 2:][:3]  # somewhere past the first message
    expected = stream(stub, 12, stop=[stop])
    with extra_gateway(mesh, tmp_path, "--stream-interval", "5") as channel:
        gathered = stream(pb_grpc.GenerationStub(channel), 12, stop=[stop])
    assert "".join(r.text for r in gathered) == "".join(r.text for r in expected)
    assert gathered[-1].finish_reason == expected[-1].finish_reason == pb.FINISH_REASON_STOP
    # the ids end at the one whose text reached the stop, however the steps merged (and only
    # those are counted)
    ids = [i for r in gathered for i in r.token_ids]
    assert ids == [i for r in expected for i in r.token_ids]
    assert gathered[-1].usage.completion_tokens == expected[-1].usage.completion_tokens == len(ids)

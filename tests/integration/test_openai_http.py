"""The OpenAI-compatible HTTP door, driven by the official `openai` client against live meshes
serving SmolLM2 (chat template included): completions and chat, whole and streamed, usage,
stop strings, seeds, and the errors a client acts on."""

from __future__ import annotations

import time
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model import packaged_models
from tests.integration.conftest import generate, scheduler_stats

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_mesh():
    spec = MeshSpec(model=str(packaged_models.ensure()), port=0,
                    worker_args=("--num-kv-blocks", "256"))
    with LocalMesh(spec) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def client(smol_mesh):
    return openai.OpenAI(base_url=smol_mesh.http_url, api_key="unused", max_retries=0)


def test_completion_is_the_grpc_answer_with_openai_fields(client, smol_mesh):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=8, temperature=0)
    with grpc.insecure_channel(smol_mesh.gateway_address) as channel:
        ids, text, _ = generate(pb_grpc.GenerationStub(channel), max_tokens=8,
                                prompt="The capital of France is")
    (choice,) = out.choices
    assert (choice.text, choice.finish_reason, choice.index) == (text, "length", 0)
    assert text.startswith(" Paris.")
    assert (out.object, out.model, out.id[:5]) == ("text_completion", MODEL, "cmpl-")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        5, 8, 13)


def test_chat_whole_and_streamed_agree_and_the_stream_ends_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24,
                                           temperature=0)
    answer = whole.choices[0].message
    assert (answer.role, whole.object, whole.choices[0].finish_reason) == (
        "assistant", "chat.completion", "stop")  # SmolLM2 ends its turn: EOS
    assert "Paris" in answer.content
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        answer.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert (chunks[-1].choices, usage.completion_tokens) == ([], whole.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt: a prefix hit


def test_stop_string_and_seeded_sampling(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=16, temperature=0, stop=["."])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (" Paris", "stop")
    draws = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                       temperature=1.0, seed=7).choices[0].text
             for _ in range(2)]
    assert draws[0] == draws[1] and draws[0]


def test_bad_parameters_are_400_and_the_service_keeps_serving(client):
    for kwargs in ({"max_tokens": 0}, {"temperature": -1}, {"model": "no-such-model"},
                   {"top_p": 1.5}):
        args = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**args)
        assert err.value.status_code == 400 and err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text


def test_models_and_health(client, smol_mesh):
    assert [m.id for m in client.models.list().data] == [MODEL]
    base = smol_mesh.http_url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/health") as response:
        assert response.status == 200


def test_a_client_that_leaves_a_stream_frees_its_blocks(client, smol_mesh):
    stream = client.completions.create(model=MODEL, prompt="Tell me a long story", stream=True,
                                       max_tokens=400, temperature=0)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while (stats := scheduler_stats(smol_mesh)).num_free_kv_blocks != stats.num_kv_blocks:
        assert time.monotonic() < deadline, "the abandoned request still holds KV blocks"
        time.sleep(0.1)
    assert stats.num_running == 0


def test_wrong_key_is_401_and_no_replica_is_503(default_model_dir):
    spec = MeshSpec(port=0, gateway_args=("--api-keys", "k1"),
                    worker_args=("--num-kv-blocks", "64"))
    with LocalMesh(spec) as mesh:
        wrong = openai.OpenAI(base_url=mesh.http_url, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.completions.create(model="meshserve-tiny-llama", prompt="Hi", max_tokens=2)
        assert err.value.status_code == 401
        right = openai.OpenAI(base_url=mesh.http_url, api_key="k1", max_retries=0)
        assert right.completions.create(model="meshserve-tiny-llama", prompt="Hi",
                                        max_tokens=2).usage.completion_tokens == 2
        for child in mesh.children:  # the replica goes: every worker and scheduler
            if "replica" in child.name:
                child.proc.kill()
        deadline = time.monotonic() + 15
        while True:
            try:
                right.completions.create(model="meshserve-tiny-llama", prompt="Hi", max_tokens=2)
            except openai.APIStatusError as exc:
                if exc.status_code == 503:
                    break
            assert time.monotonic() < deadline, "no 503 once the replica was gone"
            time.sleep(0.2)
        while _grpc_health(mesh) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "gRPC health still SERVING with no replica"
            time.sleep(0.2)
        mesh.start_replica("replica-0")  # a new replica comes: both doors serve again
        deadline = time.monotonic() + 60
        while _grpc_health(mesh) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "gRPC health never said SERVING again"
            time.sleep(0.2)
        assert right.completions.create(model="meshserve-tiny-llama", prompt="Hi",
                                        max_tokens=2).usage.completion_tokens == 2


def _grpc_health(mesh: LocalMesh) -> int:
    """The gateway's gRPC health of the Generation service (its readiness); the server's own
    entry (liveness) says SERVING throughout."""
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        server, generation = (stub.Check(health_pb2.HealthCheckRequest(service=name)).status
                              for name in ("", "meshserve.v1.Generation"))
    assert server == health_pb2.HealthCheckResponse.SERVING
    return generation

"""End to end through real processes: gateway -> Redis -> scheduler -> worker."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tokenizers import Tokenizer

from meshserve.v1 import generation_pb2 as pb
from tests.integration.conftest import (NUM_KV_BLOCKS, generate, hf_greedy, replica_addresses,
                                        scheduler_stats)

PROMPT = "The mesh serves tokens"


def test_generate_matches_transformers_greedy(stub, default_model_dir):
    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    prompt_ids = tok.encode(PROMPT).ids
    ids, text, last = generate(stub, max_tokens=32, prompt=PROMPT,
                               sampling=pb.SamplingParams(max_tokens=32, ignore_eos=True))
    assert ids == hf_greedy(default_model_dir, prompt_ids, 32, stop_at_eos=False)
    assert text == tok.decode(ids)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == 32


def test_prompt_token_ids_and_eos(stub, default_model_dir):
    prompt_ids = [1, 72, 101, 108, 108, 111]
    ids, _, last = generate(stub, prompt_token_ids=prompt_ids,
                            sampling=pb.SamplingParams(max_tokens=48))
    expected = hf_greedy(default_model_dir, prompt_ids, 48)
    assert ids == expected
    reason = pb.FINISH_REASON_EOS if expected[-1] == 2 else pb.FINISH_REASON_LENGTH
    assert last.finish_reason == reason


def test_concurrent_requests_are_batched_and_correct(stub, mesh, default_model_dir):
    prompts = [[1] + [(7 * i + j) % 250 + 3 for j in range(3 + 5 * i)] for i in range(16)]
    lengths = [8 + 2 * i for i in range(16)]
    before = scheduler_stats(mesh).num_steps

    def run(i):
        return generate(stub, prompt_token_ids=prompts[i],
                        sampling=pb.SamplingParams(max_tokens=lengths[i], ignore_eos=True))[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, ids in enumerate(results):
        assert ids == hf_greedy(default_model_dir, prompts[i], lengths[i], stop_at_eos=False), i
    stats = scheduler_stats(mesh)
    assert stats.max_batch_size_seen > 1
    # Batched: far fewer steps than the 16 requests would take one after another.
    assert stats.num_steps - before < sum(lengths)


def test_cancelled_stream_returns_kv_blocks(stub, mesh):
    assert scheduler_stats(mesh).num_free_kv_blocks == NUM_KV_BLOCKS
    call = stub.Generate(pb.GenerateRequest(
        prompt_token_ids=list(range(3, 200)),
        sampling=pb.SamplingParams(max_tokens=500, ignore_eos=True)))
    first = next(call)
    assert first.token_ids
    assert scheduler_stats(mesh).num_free_kv_blocks < NUM_KV_BLOCKS
    call.cancel()
    deadline = time.monotonic() + 10
    while scheduler_stats(mesh).num_free_kv_blocks != NUM_KV_BLOCKS:
        assert time.monotonic() < deadline, "blocks of the cancelled request never came back"
        time.sleep(0.05)
    assert scheduler_stats(mesh).num_running == 0


def test_seeded_sampling_is_reproducible(stub):
    sampling = pb.SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234,
                                 ignore_eos=True)
    first = generate(stub, prompt=PROMPT, sampling=sampling)[0]
    again = generate(stub, prompt=PROMPT, sampling=sampling)[0]
    other = generate(stub, prompt=PROMPT, sampling=pb.SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert first == again
    assert first != other


def test_stop_string_ends_the_stream(stub):
    _, text, _ = generate(stub, prompt=PROMPT,
                          sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True))
    stop = text[5:8]
    _, stopped, last = generate(stub, prompt=PROMPT, sampling=pb.SamplingParams(
        max_tokens=24, ignore_eos=True, stop=[stop]))
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert stopped == text[:text.find(stop)]


def test_list_models_and_health(stub, mesh):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["meshserve-tiny-llama"]
    assert models[0].num_replicas == 1
    (scheduler,) = replica_addresses(mesh.redis_url).values()
    (worker,) = mesh.worker_addresses["replica-0"]
    for address, service in [(mesh.gateway_address, "meshserve.v1.Generation"),
                             (scheduler, "meshserve.internal.v1.Scheduler"),
                             (worker, "meshserve.internal.v1.Worker")]:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (address, name)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_server_reflection(mesh, version):
    """grpcurl's questions, in both protocol versions: list, then describe a service."""
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="meshserve.v1.Generation"),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=f"grpc.reflection.{version}.ServerReflection")]
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        call = channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        listed, generation, itself = list(call(iter(asks), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"meshserve.v1.Generation", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in generation.file_descriptor_response.file_descriptor_proto]
    assert "Generate" in [m.name for m in files[0].service[0].method]
    (own,) = [descriptor_pb2.FileDescriptorProto.FromString(raw)
              for raw in itself.file_descriptor_response.file_descriptor_proto]
    assert (own.package, own.service[0].name) == (f"grpc.reflection.{version}",
                                                  "ServerReflection")


BAD_REQUESTS = {
    "empty prompt": (dict(prompt=""), "exactly one of prompt"),
    "prompt and ids": (dict(prompt="a", prompt_token_ids=[5]), "exactly one of prompt"),
    "max_tokens 0": (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
    "past the context": (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=5000)),
                         "exceeds the context"),
    "unknown model": (dict(prompt="hi", model="gpt-9"), "unknown model"),
    "negative temperature": (dict(prompt="hi", sampling=pb.SamplingParams(
        max_tokens=4, temperature=-1)), "temperature"),
    "top_p above 1": (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=4, top_p=1.5)),
                      "top_p"),
    "top_p negative": (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=4, top_p=-0.1)),
                       "top_p"),
    "prompt too long": (dict(prompt_token_ids=[5] * 1024), "prompt must be shorter"),
    "token outside vocab": (dict(prompt_token_ids=[5, 100000]), "outside the vocabulary"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_service_keeps_serving(stub, case):
    fields, message = BAD_REQUESTS[case]
    fields = dict(fields)
    fields.setdefault("sampling", pb.SamplingParams(max_tokens=4))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    ids, _, last = generate(stub, max_tokens=3, prompt="still serving")
    assert len(ids) == 3 and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_client_strings_in_errors_are_bounded(stub):
    """Echoed strings are cut: the status stays the one the mistake deserves."""
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt="hi", model="é" * 3000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown model" in err.value.details() and "(3000 characters)" in err.value.details()
    long_id = "😀" * 3000
    first = stub.Generate(pb.GenerateRequest(prompt="a", request_id=long_id,
                                             sampling=pb.SamplingParams(max_tokens=800,
                                                                        ignore_eos=True)))
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt="b", request_id=long_id)
    first.cancel()
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(err.value.details()) < 500


def test_a_vanishing_temperature_is_greedy_not_the_least_likely_token(stub):
    """logits / 1e-40 overflows to inf: such a row takes its argmax, as temperature 0 does."""
    greedy, tiny = (generate(stub, prompt_token_ids=[1, 9, 8, 7], sampling=pb.SamplingParams(
        max_tokens=12, ignore_eos=True, temperature=t, seed=3))[0] for t in (0.0, 1e-40))
    assert tiny == greedy


UNDECODABLE = {
    "invalid UTF-8 in prompt": bytes([1 << 3 | 2, 2, 0xFF, 0xFE]),  # field 1, 2 bytes
    "truncated": pb.GenerateRequest(prompt="The mesh serves tokens").SerializeToString()[:9],
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_undecodable_request_is_invalid_argument(mesh, stub, case):
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        call = channel.unary_stream("/meshserve.v1.Generation/Generate",
                                    request_serializer=lambda raw: raw,
                                    response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            list(call(UNDECODABLE[case], timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid /meshserve.v1.Generation/Generate message" in err.value.details()
    assert len(generate(stub, max_tokens=3, prompt="still serving")[0]) == 3


def test_a_request_id_runs_once_at_a_time(stub):
    sampling = pb.SamplingParams(max_tokens=800, ignore_eos=True)
    first = stub.Generate(pb.GenerateRequest(prompt="a", request_id="job-7", sampling=sampling))
    assert next(first).request_id == "job-7"
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt="b", request_id="job-7")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()
    deadline = time.monotonic() + 10
    while True:  # the claim is released as the first call ends
        try:
            ids, _, last = generate(stub, max_tokens=3, prompt="b", request_id="job-7")
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() < deadline
            time.sleep(0.05)
    assert len(ids) == 3 and last.request_id == "job-7"


def test_a_second_step_stream_to_a_busy_worker_is_refused_and_the_first_serves_on(stub, mesh):
    """A worker serves one scheduler's step stream at a time: a second connection to its step
    port (a stray scheduler) gets an error frame saying so and is closed, and the replica's own
    stream is untouched."""
    import asyncio

    from meshserve.internal.v1 import worker_pb2, worker_pb2_grpc
    from services.step import link

    address = mesh.worker_addresses["replica-0"][0]
    with grpc.insecure_channel(address) as channel:
        described = worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest())
    assert described.step_port

    async def intrude():
        reader, writer = await link.connect(address.rsplit(":", 1)[0], described.step_port)
        frame = await link.read_frame(reader)
        with pytest.raises(link.StepLinkClosed):
            await link.read_frame(reader)
        writer.close()
        return frame

    assert asyncio.run(intrude()) == (link.ERROR,
                                      b"this worker already serves a scheduler's step stream")
    ids, _, _ = generate(stub, max_tokens=8, prompt=PROMPT)
    assert len(ids) == 8


def test_a_cpu_mesh_runs_its_worker_on_cpus_of_its_own_when_it_can(mesh):
    """MeshSpec.cpu_bind="auto" (the default): on a machine with a CPU to spare, every thread of
    the worker runs on the worker's CPUs and every thread of the gateway and the scheduler on
    the others (deploy/cpu_binding.py)."""
    from deploy.cpu_binding import workers_on_cpu

    plan = mesh.cpu_plan
    if len(os.sched_getaffinity(0)) < 2 or not workers_on_cpu(mesh.spec.worker_args):
        assert plan is None
        pytest.skip("one CPU, or GPU workers: nothing to bind")
    assert plan is not None
    for child in mesh.children:
        threads = os.listdir(f"/proc/{child.proc.pid}/task")
        expected = plan.workers[0] if "worker" in child.name else plan.rest
        assert {frozenset(os.sched_getaffinity(int(t))) for t in threads} == {expected}, (
            child.name)

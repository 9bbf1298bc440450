"""--seed (vLLM's): requests that bring no seed draw the same tokens after a restart."""

from __future__ import annotations

import time

import grpc

from deploy.cli import spec_from_args, up_parser
from deploy.launcher import LocalMesh
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import generate

UNSEEDED = pb.SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)


def test_a_seeded_scheduler_samples_unseeded_requests_the_same_after_a_restart():
    args = up_parser().parse_args(["--model", "tiny", "--seed", "7", "--port", "0",
                                   "--http-port", "-1"])
    with LocalMesh(spec_from_args(args)) as mesh, \
            grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        first = generate(stub, prompt="hi", sampling=UNSEEDED)[0]
        second = generate(stub, prompt="hi", sampling=UNSEEDED)[0]
        assert first != second  # each request draws its own seed from the scheduler's stream
        (scheduler,) = [c for c in mesh.children if c.name.endswith("scheduler")]
        mesh.kill(scheduler, sig=15)
        mesh.start_scheduler("replica-0")
        assert _first_answer(stub) == first


def _first_answer(stub) -> list[int]:
    """The first request the restarted scheduler answers (the gateway may still try the old
    address once before its table refreshes: that attempt fails before any token)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return generate(stub, prompt="hi", sampling=UNSEEDED)[0]
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert time.monotonic() < deadline, "the restarted scheduler never answered"
            time.sleep(0.2)

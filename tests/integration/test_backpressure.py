"""Admission limits: what does not fit is refused with RESOURCE_EXHAUSTED, and nothing leaks."""

from __future__ import annotations

import grpc
import pytest

from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import extra_gateway, generate


def test_gateway_refuses_past_its_inflight_limit(mesh, tmp_path):
    with extra_gateway(mesh, tmp_path, "--max-inflight-requests", "1") as channel:
        stub = pb_grpc.GenerationStub(channel)
        generate(stub, max_tokens=2, prompt="warm")  # knows the replicas now
        running = stub.Generate(pb.GenerateRequest(
            prompt="long", sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True)))
        next(running)
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, max_tokens=2, prompt="one too many")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 requests" in err.value.details()
        running.cancel()
        assert len(generate(stub, max_tokens=2, prompt="room again")[0]) == 2

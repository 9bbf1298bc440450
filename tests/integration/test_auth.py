"""A gateway started with API keys: calls need `authorization: Bearer <key>`; health does not."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import extra_gateway


@pytest.fixture(scope="module")
def keyed_gateway(mesh, tmp_path_factory):
    """A second gateway in front of the session mesh's replicas, with two keys."""
    with extra_gateway(mesh, tmp_path_factory.mktemp("auth"), "--api-keys", "k1,k2") as channel:
        yield channel


def _generate(channel, metadata=None) -> list[int]:
    stub = pb_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2))
    deadline = time.monotonic() + 10
    while True:  # the new gateway learns the replicas on its first refresh
        try:
            return [t for m in stub.Generate(request, metadata=metadata) for t in m.token_ids]
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer nope")],
                                      [("authorization", "k1")]])
def test_missing_or_wrong_key_is_unauthenticated(keyed_gateway, metadata):
    with pytest.raises(grpc.RpcError) as err:
        _generate(keyed_gateway, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in err.value.details()


def test_each_key_is_accepted_and_health_stays_open(keyed_gateway):
    for key in ("k1", "k2"):
        assert len(_generate(keyed_gateway, [("authorization", f"Bearer {key}")])) == 2
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.GenerationStub(keyed_gateway).ListModels(pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(keyed_gateway).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING

"""--served-model-name: one name, honoured end to end (ListModels, /v1/models, requests)."""

from __future__ import annotations

import grpc
import openai
import pytest

from deploy.cli import spec_from_args, up_parser
from deploy.launcher import LocalMesh
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import generate


def test_up_passes_vllm_flags_to_the_right_services():
    args = up_parser().parse_args([
        "--model", "tiny", "-tp", "2", "-dp", "3", "--max-num-seqs", "32", "--dtype", "float32",
        "--served-model-name", "x", "--no-enable-prefix-caching", "--api-key", "k1",
        "--api-key", "k2", "--chat-template", "t.jinja", "--enforce-eager", "--seed", "7",
        "--routing-policy", "least-load"])
    spec = spec_from_args(args)
    assert (spec.model, spec.tp, spec.replicas) == ("", 2, 3)
    assert spec.worker_args == ("--max-num-seqs", "32", "--dtype", "float32", "--enforce-eager")
    assert spec.scheduler_args == ("--max-num-seqs", "32", "--served-model-name", "x",
                                   "--seed", "7", "--no-enable-prefix-caching")
    assert spec.gateway_args == ("--served-model-name", "x", "--chat-template", "t.jinja",
                                 "--routing-policy", "least-load", "--api-keys", "k1,k2")


def test_a_served_name_is_the_only_name_and_it_works_everywhere():
    args = up_parser().parse_args(["--model", "tiny", "--served-model-name", "house-model",
                                   "--port", "0", "--http-port", "0"])
    with LocalMesh(spec_from_args(args)) as mesh, \
            grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        (info,) = stub.ListModels(pb.ListModelsRequest()).models
        assert (info.name, info.num_replicas) == ("house-model", 1)
        ids, _, _ = generate(stub, max_tokens=4, prompt="hi", model="house-model")
        assert len(ids) == 4
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, max_tokens=4, prompt="hi", model="meshserve-tiny-llama")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client = openai.OpenAI(base_url=mesh.http_url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["house-model"]
        out = client.completions.create(model="house-model", prompt="hi", max_tokens=3)
        assert out.model == "house-model" and out.usage.completion_tokens == 3

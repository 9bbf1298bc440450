"""Every supported TP x PP shape, served through real processes, gives transformers' greedy
tokens: the same 32 tokens as TP=1 PP=1 and as `LlamaForCausalLM.generate`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.checkpoints import GQA_CONFIG, save_hf_llama
from tests.integration.conftest import hf_greedy, scrape, value

PROMPTS = [[1, 50, 60, 70, 80], [1] + list(range(100, 140)), [1, 7]]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory, default_model_dir):
    return save_hf_llama(tmp_path_factory.mktemp("gqa"), default_model_dir, **GQA_CONFIG)


def served_greedy(model_dir, tp: int, pp: int) -> list[list[int]]:
    spec = MeshSpec(model=str(model_dir), tp=tp, pp=pp, port=0,
                    worker_args=("--num-kv-blocks", "64"))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def one(prompt):
            sampling = pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
            return [t for m in stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt,
                                                                sampling=sampling), timeout=120)
                    for t in m.token_ids]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together
            tokens = list(pool.map(one, PROMPTS))
        _check_traffic_metrics(mesh, tp, pp)
        return tokens


def _check_traffic_metrics(mesh: LocalMesh, tp: int, pp: int) -> None:
    """Every worker counted the TP collectives and stage-link bytes it took part in."""
    for stage in range(pp):
        for rank in range(tp):
            samples = scrape(mesh.metrics_url(f"replica-0-worker-pp{stage}-tp{rank}"))
            all_reduces = value(samples, "meshserve:tp_collectives_total", op="all_reduce")
            assert (all_reduces > 0) == (tp > 1), (stage, rank, all_reduces)
            waited = value(samples, "meshserve:tp_collective_seconds_total", op="all_reduce")
            assert (waited > 0) == (tp > 1)  # gloo on CPUs: the host waits for them
            sent = value(samples, "meshserve:stage_link_sent_bytes_total")
            received = value(samples, "meshserve:stage_link_received_bytes_total")
            assert (sent > 0) == (stage < pp - 1) and (received > 0) == (stage > 0)


def reference(model_dir) -> list[list[int]]:
    return [hf_greedy(model_dir, p, NUM_TOKENS, stop_at_eos=False) for p in PROMPTS]


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (1, 2), (1, 4), (2, 2)])
def test_default_model(default_model_dir, tp, pp):
    assert served_greedy(default_model_dir, tp, pp) == reference(default_model_dir)


def test_gqa_model_with_tp_above_kv_heads(gqa_model_dir):
    # 2 KV heads, TP=4: each KV head is replicated on two ranks.
    assert served_greedy(gqa_model_dir, 4, 1) == reference(gqa_model_dir)

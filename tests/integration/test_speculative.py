"""n-gram speculative decoding through real processes: greedy tokens identical to transformers'
(float32 on CPU) at TP 1 and 2, PP 2 and TP2 x PP2, with proposals made and verified; and on
SmolLM2 (real weights), whose answers repeat their prompt, proposals accepted."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model import packaged_models
from tests.integration.conftest import hf_greedy, scrape, value

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})
NUM_TOKENS = 40


def served_with_speculation(model_dir, prompts, tp=1, pp=1):
    """(greedy tokens of each prompt, batched together; the scheduler's metrics samples)."""
    spec = MeshSpec(model=str(model_dir), tp=tp, pp=pp, port=0,
                    worker_args=("--num-kv-blocks", "128"),
                    scheduler_args=("--speculative-config", NGRAM))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def one(prompt):
            sampling = pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
            return [t for m in stub.Generate(pb.GenerateRequest(
                prompt_token_ids=prompt, sampling=sampling), timeout=300) for t in m.token_ids]

        with ThreadPoolExecutor(len(prompts)) as pool:  # verified in one batch
            served = list(pool.map(one, prompts))
        return served, scrape(mesh.metrics_url("replica-0-scheduler"))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_shape_gives_transformers_greedy_tokens(default_model_dir, tp, pp):
    # The tiny random model hardly repeats itself: nearly every proposal is rejected, which is
    # what this checks at every shape (the KV of rejected positions written, then written over).
    prompts = [[1] + [40, 41, 42, 43, 44] * 4, [1, 7, 8, 9, 7, 8, 9, 7, 8], [1, 300, 17, 250]]
    served, samples = served_with_speculation(default_model_dir, prompts, tp, pp)
    assert served == [hf_greedy(default_model_dir, p, NUM_TOKENS, stop_at_eos=False)
                      for p in prompts]
    assert value(samples, "meshserve:spec_decode_num_draft_tokens_total") > 0


def test_smollm2_accepts_proposals_and_gives_transformers_greedy_tokens():
    from tokenizers import Tokenizer

    model_dir = packaged_models.ensure()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = ["Repeat the sentence three times. The quick brown fox jumps over the lazy dog. "
             "The quick brown fox jumps over the lazy dog. The quick",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef"]
    prompts = [tokenizer.encode(t).ids for t in texts]
    served, samples = served_with_speculation(model_dir, prompts)
    assert served == [hf_greedy(model_dir, p, NUM_TOKENS, stop_at_eos=False) for p in prompts]
    drafts = value(samples, "meshserve:spec_decode_num_draft_tokens_total")
    accepted = value(samples, "meshserve:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafts, (accepted, drafts)
    # Accepted proposals are tokens that took no step of their own.
    assert value(samples, "meshserve:steps_total") < len(prompts) * NUM_TOKENS

"""Speculative decoding through real processes, n-gram and a draft model: greedy tokens
identical to transformers' (float32 on CPU) at TP 1 and 2, PP 2 and TP2 x PP2, with proposals made
and verified (a self-draft has every one accepted); on SmolLM2 (real weights), whose answers
repeat their prompt, n-gram proposals accepted; seeded sampling the same with speculation on and
off, and resumed token for token after its replica dies."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from deploy.cli import speculative_worker_args
from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model import packaged_models
from tests.integration.conftest import hf_greedy, scheduler_stats, scrape, value

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})
NUM_TOKENS = 40
GREEDY = pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)


def seeded(seed: int, max_tokens: int = NUM_TOKENS) -> pb.SamplingParams:
    # top_k keeps the inverse-CDF draw over a few tokens: the float32 sums of its probabilities
    # then move by too little between batchings (one position at a time, or K + 1 verified in
    # one step) to carry a draw across a boundary between two tokens.
    return pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, top_k=8,
                             seed=seed)


def draft_config(draft_dir, k: int = 3) -> str:
    return json.dumps({"method": "draft_model", "model": str(draft_dir),
                       "num_speculative_tokens": k})


def served(model_dir, prompts, sampling=(), tp=1, pp=1, speculate=True, config=NGRAM):
    """(the tokens of each prompt, batched together; the scheduler's metrics samples).
    sampling: each prompt's SamplingParams (default greedy); config: the speculative config,
    whose draft model (if any) the workers get as `meshserve up` gives it them."""
    spec = MeshSpec(model=str(model_dir), tp=tp, pp=pp, port=0,
                    worker_args=("--num-kv-blocks", "128",
                                 *(speculative_worker_args(config) if speculate else ())),
                    scheduler_args=("--speculative-config", config) if speculate else ())
    sampling = list(sampling) or [GREEDY] * len(prompts)
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def one(prompt, params):
            return [t for m in stub.Generate(pb.GenerateRequest(
                prompt_token_ids=prompt, sampling=params), timeout=300) for t in m.token_ids]

        with ThreadPoolExecutor(len(prompts)) as pool:  # verified in one batch
            out = list(pool.map(one, prompts, sampling))
        return out, scrape(mesh.metrics_url("replica-0-scheduler"))


def smollm2_prompts() -> tuple:
    from tokenizers import Tokenizer

    model_dir = packaged_models.ensure()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = ["Repeat the sentence three times. The quick brown fox jumps over the lazy dog. "
             "The quick brown fox jumps over the lazy dog. The quick",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef"]
    return model_dir, [tokenizer.encode(t).ids for t in texts]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_shape_gives_transformers_greedy_tokens(default_model_dir, tp, pp):
    # The tiny random model hardly repeats itself: nearly every proposal is rejected, which is
    # what this checks at every shape (the KV of rejected positions written, then written over).
    prompts = [[1] + [40, 41, 42, 43, 44] * 4, [1, 7, 8, 9, 7, 8, 9, 7, 8], [1, 300, 17, 250]]
    out, samples = served(default_model_dir, prompts, tp=tp, pp=pp)
    assert out == [hf_greedy(default_model_dir, p, NUM_TOKENS, stop_at_eos=False)
                      for p in prompts]
    assert value(samples, "meshserve:spec_decode_num_draft_tokens_total") > 0


def test_smollm2_accepts_proposals_and_gives_transformers_greedy_tokens():
    model_dir, prompts = smollm2_prompts()
    out, samples = served(model_dir, prompts)
    assert out == [hf_greedy(model_dir, p, NUM_TOKENS, stop_at_eos=False) for p in prompts]
    drafts = value(samples, "meshserve:spec_decode_num_draft_tokens_total")
    accepted = value(samples, "meshserve:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafts, (accepted, drafts)
    # vLLM's per position count: a proposal is accepted only after every one before it.
    per_pos = [value(samples, "meshserve:spec_decode_num_accepted_tokens_per_pos_total",
                     position=str(i)) for i in range(4)]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True), per_pos
    # Accepted proposals are tokens that took no step of their own.
    assert value(samples, "meshserve:steps_total") < len(prompts) * NUM_TOKENS


def test_smollm2_seeded_sampling_is_the_same_with_speculation_on_and_off():
    # A drawn token is a pure function of (seed, position, logits): verifying a proposal draws
    # the target's token at its position as a plain decode would, and keeps it if they agree.
    model_dir, prompts = smollm2_prompts()
    sampling = [seeded(seed) for seed in (11, 12)]
    off, _ = served(model_dir, prompts, sampling, speculate=False)
    on, samples = served(model_dir, prompts, sampling)
    assert on == off
    assert off != [hf_greedy(model_dir, p, NUM_TOKENS, stop_at_eos=False) for p in prompts]
    assert value(samples, "meshserve:spec_decode_num_accepted_tokens_total") > 0


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_seeded_sampling_is_the_same_with_speculation_on_and_off_across_stages(
        default_model_dir, tp, pp):
    prompts = [[1] + [40, 41, 42, 43, 44] * 4, [1, 7, 8, 9, 7, 8, 9, 7, 8]]
    sampling = [seeded(seed) for seed in (3, 4)]
    off, _ = served(default_model_dir, prompts, sampling, tp=tp, pp=pp, speculate=False)
    on, samples = served(default_model_dir, prompts, sampling, tp=tp, pp=pp)
    assert on == off
    assert value(samples, "meshserve:spec_decode_num_draft_tokens_total") > 0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_a_seeded_stream_resumes_token_for_token_when_its_speculating_replica_dies(
        default_model_dir, gqa_dir, method):
    """Two replicas speculating: the scheduler of the one running a seeded stream is killed
    (kill -9) mid-stream; the stream ends on the other replica as in a quiet run."""
    config = NGRAM if method == "ngram" else draft_config(gqa_dir, k=2)
    spec = MeshSpec(replicas=2, port=0, heartbeat_ttl_s=1.5,
                    worker_args=("--num-kv-blocks", "128", *speculative_worker_args(config)),
                    scheduler_args=("--speculative-config", config))
    prompt = [1] + [40, 41, 42, 43, 44] * 4
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=seeded(5, 300))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        quiet = [t for m in stub.Generate(request, timeout=300) for t in m.token_ids]
        stream = stub.Generate(request, timeout=300)
        resumed = list(next(stream).token_ids)
        victim = next(r for r in ("replica-0", "replica-1")
                      if scheduler_stats(mesh, r).num_running)
        mesh.kill(next(c for c in mesh.children if c.name == f"{victim}-scheduler"))
        for msg in stream:
            resumed += msg.token_ids
        gateway_log = next(c for c in mesh.children if c.name == "gateway").log.read_text()
        survivor = "replica-1" if victim == "replica-0" else "replica-0"
        drafts = value(scrape(mesh.metrics_url(f"{survivor}-scheduler")),
                       "meshserve:spec_decode_num_draft_tokens_total")
    assert f"replica {victim} failed" in gateway_log  # it resumed on the other replica
    assert drafts > 0  # which went on speculating
    assert len(resumed) == 300 and resumed == quiet
    assert quiet != hf_greedy(default_model_dir, prompt, 300, stop_at_eos=False)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_a_self_draft_has_every_proposal_accepted_and_gives_transformers_greedy_tokens(
        default_model_dir, tp, pp):
    """draft = target: the draft's greedy proposals are the target's own next tokens."""
    prompts = [[1] + [40, 41, 42, 43, 44] * 4, [1, 7, 8, 9, 7, 8, 9, 7, 8], [1, 300, 17, 250]]
    out, samples = served(default_model_dir, prompts, tp=tp, pp=pp,
                          config=draft_config(default_model_dir))
    assert out == [hf_greedy(default_model_dir, p, NUM_TOKENS, stop_at_eos=False)
                   for p in prompts]
    drafts = value(samples, "meshserve:spec_decode_num_draft_tokens_total")
    assert drafts > 0
    assert value(samples, "meshserve:spec_decode_num_accepted_tokens_total") == drafts


def test_another_draft_model_keeps_the_targets_tokens_greedy_and_seeded(default_model_dir,
                                                                        gqa_dir):
    """A draft that is another model (the 2-layer GQA checkpoint, same vocabulary): its proposals
    are mostly rejected, and the tokens are the target's, greedy (transformers') and seeded (the
    same as without speculation, the draft's proposals being point masses)."""
    prompts = [[1] + [40, 41, 42, 43, 44] * 4, [1, 7, 8, 9, 7, 8, 9, 7, 8]]
    sampling = [GREEDY, seeded(9)]
    config = draft_config(gqa_dir, k=2)
    out, samples = served(default_model_dir, prompts, sampling, config=config)
    assert out[0] == hf_greedy(default_model_dir, prompts[0], NUM_TOKENS, stop_at_eos=False)
    off, _ = served(default_model_dir, prompts, sampling, speculate=False)
    assert out == off
    drafts = value(samples, "meshserve:spec_decode_num_draft_tokens_total")
    accepted = value(samples, "meshserve:spec_decode_num_accepted_tokens_total")
    assert 0 <= accepted < drafts, (accepted, drafts)

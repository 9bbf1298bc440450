"""Our model against transformers on the same checkpoint folder, float32, TP=1.

Every run goes through paged attention (block_size 16, scattered blocks): one prefill step, then
single-token decode steps that read the cache. Logits are compared for every token fed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from services.model import ParallelContext, count_collectives, load_model, stage_layer_range
from services.model import loader as loader_module

from tests.checkpoints import GQA_CONFIG, save_hf_llama
from .paged import BLOCK_SIZE, PagedRunner, hf_greedy, hf_logits

NUM_NEW = 33  # the prefill picks the first token, 32 decode steps through the cache the rest
ATOL = 1e-4
PROMPT = "The scheduler sends a plan for every step, and the workers return the tokens they sampled."
OTHER_PROMPTS = ("Hi", "héllo wörld ✓ and then some more words", PROMPT + " " + PROMPT[:40])


def encode(model_dir: Path, text: str) -> list[int]:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_ours(model_dir: Path, prompts: dict[str, list[int]], num_new: int, **load_kwargs):
    runner = PagedRunner([load_model(model_dir, ParallelContext(), **load_kwargs)])
    return runner.generate(prompts, num_new)


def assert_matches_hf(model_dir: Path, prompt: list[int], num_new: int = NUM_NEW, min_distinct: int = 8) -> None:
    with count_collectives() as counts:
        tokens, logits = run_ours(model_dir, {"a": prompt}, num_new)
    assert not counts, "no collective may be issued at TP=1"
    hf = hf_model(model_dir)
    expected = hf_greedy(hf, prompt, num_new)
    assert tokens["a"] == expected
    assert len(set(expected)) >= min_distinct, "the continuation loops; the check would be weak"
    reference = hf_logits(hf, prompt + expected[:-1])  # [len(prompt) + num_new - 1, V]
    assert logits["a"].shape == reference.shape
    assert (logits["a"] - reference).abs().max().item() <= ATOL


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "gqa_dir"])
def test_logits_and_greedy_tokens_match_transformers(checkpoint: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(checkpoint)
    prompt = encode(model_dir, PROMPT)
    assert len(prompt) > BLOCK_SIZE
    assert_matches_hf(model_dir, prompt)


def test_batched_prefill_and_decode_equal_each_alone(tiny_dir: Path) -> None:
    prompts = {f"s{i}": encode(tiny_dir, text) for i, text in enumerate(OTHER_PROMPTS)}
    assert len({len(p) for p in prompts.values()}) == 3
    together, together_logits = run_ours(tiny_dir, prompts, 12)
    for seq_id, prompt in prompts.items():
        alone, alone_logits = run_ours(tiny_dir, {seq_id: prompt}, 12)
        assert together[seq_id] == alone[seq_id]
        assert (together_logits[seq_id] - alone_logits[seq_id]).abs().max().item() <= ATOL


def test_chunked_prefill_mixed_with_decode_matches_transformers(tiny_dir: Path) -> None:
    """b's prompt arrives in chunks (7, 13, rest) in the same steps as a's decodes."""
    a, b = encode(tiny_dir, OTHER_PROMPTS[1]), encode(tiny_dir, OTHER_PROMPTS[2])
    runner = PagedRunner([load_model(tiny_dir, ParallelContext())])
    a_seen, a_logits = list(a), [runner.step({"a": a})["a"]]
    b_logits = []
    for chunk in (b[:7], b[7:20], b[20:]):
        a_seen.append(int(a_logits[-1][-1].argmax()))
        out = runner.step({"a": a_seen[-1:], "b": chunk})
        a_logits.append(out["a"])
        b_logits.append(out["b"])
    hf = hf_model(tiny_dir)
    assert (torch.cat(b_logits) - hf_logits(hf, b)).abs().max().item() <= ATOL
    assert (torch.cat(a_logits) - hf_logits(hf, a_seen)).abs().max().item() <= ATOL


def test_sharded_checkpoint_with_tied_head(tmp_path: Path, tiny_dir: Path) -> None:
    config = {**GQA_CONFIG, "tie_word_embeddings": True, "rope_scaling": None, "num_hidden_layers": 3}
    model_dir = save_hf_llama(tmp_path, tiny_dir, max_shard_size="200KB", **config)
    assert (model_dir / "model.safetensors.index.json").exists()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    assert_matches_hf(model_dir, encode(model_dir, PROMPT), num_new=8, min_distinct=3)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_families_match_transformers(model_type: str, tmp_path: Path) -> None:
    import transformers

    config_cls = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[model_type]
    config = config_cls(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, initializer_range=0.15, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    if model_type == "qwen2":  # HF leaves q/k/v biases at zero; make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    hf.save_pretrained(tmp_path)
    assert_matches_hf(tmp_path, list(range(3, 40)), num_new=8, min_distinct=3)


@pytest.mark.parametrize("split", [None, [1, 3]])
def test_pipeline_stages_match_one_stage(tiny_dir: Path, split: list[int] | None) -> None:
    prompt = encode(tiny_dir, PROMPT)
    expected, expected_logits = run_ours(tiny_dir, {"a": prompt}, 8)
    num_stages = 4 if split is None else len(split)
    stages = []
    for pp_rank in range(num_stages):
        ctx = ParallelContext(pp_rank=pp_rank, pp_size=num_stages)
        stages.append(load_model(tiny_dir, ctx, layer_range=stage_layer_range(4, num_stages, pp_rank, split)))
    tokens, logits = PagedRunner(stages).generate({"a": prompt}, 8)
    assert tokens == expected
    assert (logits["a"] - expected_logits["a"]).abs().max().item() <= ATOL


def test_loader_reads_only_the_stage_slabs(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real_safe_open = loader_module.safe_open

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            read.append(name)
            return self.inner.get_slice(name)

    monkeypatch.setattr(loader_module, "safe_open", RecordingFile)
    load_model(tiny_dir, ParallelContext(pp_rank=1, pp_size=2))
    layers_read = {name.split(".")[2] for name in read if name.startswith("model.layers.")}
    assert layers_read == {"2", "3"}
    # the last stage owns the (tied) head, read from the embedding; the embedding itself is not built
    assert read.count("model.embed_tokens.weight") == 1 and "model.norm.weight" in read

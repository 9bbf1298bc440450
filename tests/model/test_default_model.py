"""The default checkpoint: deterministic bytes, loadable by tokenizers and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from services.model.default_model import (
    CONFIG,
    DEFAULT_MODEL_NAME,
    default_model_dir,
    ensure_default_model,
    write_tiny_checkpoint,
)

TEXT = "héllo wörld ✓"


def read_all(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_two_writes_give_identical_bytes(tmp_path: Path, tiny_dir: Path) -> None:
    write_tiny_checkpoint(tmp_path)
    assert read_all(tmp_path) == read_all(tiny_dir)
    assert set(read_all(tmp_path)) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_racing_processes_make_one_complete_copy_with_the_same_bytes(tmp_path: Path, tiny_dir: Path) -> None:
    """Two fresh interpreters (different string-hash seeds) race to make the default model."""
    code = "from services.model.default_model import ensure_default_model; print(ensure_default_model())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "MESHSERVE_CACHE": str(tmp_path), "PYTHONHASHSEED": str(seed)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert outputs == [str(target)] * 2
    assert os.listdir(target.parent) == [DEFAULT_MODEL_NAME]  # no temporary folder left behind
    assert read_all(target) == read_all(tiny_dir)


def test_ensure_default_model_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path))
    path = ensure_default_model()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_model_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_model_dir() == tmp_path / "a" / "models" / "meshserve-tiny-llama"
    monkeypatch.delenv("MESHSERVE_CACHE")
    assert default_model_dir() == tmp_path / "b" / "meshserve" / "models" / "meshserve-tiny-llama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".cache" / "meshserve" / "models" / "meshserve-tiny-llama"


def test_checkpoint_shape_and_size(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config == CONFIG
    assert config["num_key_value_heads"] % 4 == 0 and config["num_hidden_layers"] % 4 == 0  # TP=4, PP=4
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 4_000_000


def test_tokenizer_round_trip_in_tokenizers_and_transformers(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    ids = fast.encode(TEXT).ids
    assert ids[0] == 1 and 2 not in ids  # <s> prepended, no </s>
    assert hf(TEXT)["input_ids"] == ids
    assert fast.decode(ids) == TEXT
    assert hf.decode(ids, skip_special_tokens=True) == TEXT
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    vocab = fast.get_vocab()
    assert [vocab["<unk>"], vocab["<s>"], vocab["</s>"]] == [0, 1, 2]
    assert len(vocab) <= CONFIG["vocab_size"]
    assert len(fast.encode("the workers").ids) < len("the workers")  # merges were learnt


def test_loads_in_transformers_with_tied_head(tiny_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.num_key_value_heads == 4 and model.config.head_dim == 16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 50, 60]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()

"""The default model: a tiny Llama checkpoint in Hugging Face format, made here, deterministically.

Same bytes on every machine and every run: weights from a fixed torch.Generator seed, JSON with
sorted keys, a byte-level BPE whose merges are learnt in plain Python with explicit tie-breaking
from a fixed text. Loads in transformers (model and tokenizer) and in `tokenizers` as it is.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from services.model.cache import TINY_MODEL_NAME, default_model_dir, models_root, write_once

DEFAULT_MODEL_NAME = TINY_MODEL_NAME  # what a service with no --model serves
__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir", "ensure_default_model", "models_root",
           "write_tiny_checkpoint"]
WEIGHT_SEED = 20240501
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; the 256 byte tokens follow at 3..258

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

# Source of the BPE merges; changing it changes the default model.
MERGE_TEXT = (
    "The mesh serves a language model across many machines. Each worker holds a shard of the "
    "weights and a share of the cache; the scheduler sends a plan for every step, and the workers "
    "return the tokens they sampled. A request arrives at the gateway, which reads the prompt, "
    "turns the text into tokens, and sends them to the replica that already holds the longest "
    "prefix of the prompt in its cache. When the model is too large for one device, the layers "
    "are cut into stages and every stage passes the hidden state to the next one. Inside a stage "
    "the weight matrices are split, so that every rank computes its part and the ranks sum their "
    "results. The answer streams back to the client token by token, and the text is decoded as it "
    "goes. Hello world! Testing, testing: one, two, three. 0123456789 + - * / = ( ) [ ] { } < > "
    "héllo wörld, naïve café, ✓ done.\n"
)


def ensure_default_model() -> Path:
    """The tiny test model's folder (what a service with no --model serves), written on first
    use."""
    return write_once(default_model_dir(), write_tiny_checkpoint)


def write_tiny_checkpoint(path: str | Path) -> None:
    """Writes config.json, model.safetensors, tokenizer files into `path` (created if absent)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", CONFIG)
    _write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    save_file(tiny_weights(), str(path / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save(str(path / "tokenizer.json"), pretty=True)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(path / "special_tokens_map.json", special)
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": CONFIG["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            **special,
        },
    )
    for file in path.iterdir():
        file.chmod(0o644)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def tiny_weights() -> dict[str, torch.Tensor]:
    """HF tensor names -> float32 weights; no lm_head, it is tied to the embedding.

    The standard deviations are picked so that greedy continuations neither loop on one token nor
    sit near ties (top-1 vs top-2 logit gaps ~1e-2, far above float32 noise); norm weights 1 ± 0.05.
    """
    c = CONFIG
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    hidden, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def normal(std: float, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    weights = {"model.embed_tokens.weight": normal(0.15, c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = 1.0 + normal(0.05, hidden)
        weights[f"{p}.self_attn.q_proj.weight"] = normal(0.2, q_out, hidden)
        weights[f"{p}.self_attn.k_proj.weight"] = normal(0.2, kv_out, hidden)
        weights[f"{p}.self_attn.v_proj.weight"] = normal(0.1, kv_out, hidden)
        weights[f"{p}.self_attn.o_proj.weight"] = normal(0.2, hidden, q_out)
        weights[f"{p}.post_attention_layernorm.weight"] = 1.0 + normal(0.05, hidden)
        weights[f"{p}.mlp.gate_proj.weight"] = normal(0.1, inter, hidden)
        weights[f"{p}.mlp.up_proj.weight"] = normal(0.1, inter, hidden)
        weights[f"{p}.mlp.down_proj.weight"] = normal(0.2, hidden, inter)
    weights["model.norm.weight"] = 1.0 + normal(0.05, hidden)
    return {name: t.contiguous() for name, t in weights.items()}


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE: <unk> <s> </s>, the 256 bytes in byte order, then learnt merges (<= 512)."""
    byte_tokens = [_BYTE_TO_CHAR[b] for b in range(256)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *byte_tokens])}
    merges = learn_merges(MERGE_TEXT, CONFIG["vocab_size"] - len(vocab))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def learn_merges(text: str, max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair)
    until max_merges or no pair occurs twice."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    word_counts = Counter(word for word, _ in pre.pre_tokenize_str(text))
    words = {tuple(word): count for word, count in sorted(word_counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < 2:
            break
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()

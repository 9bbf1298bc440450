"""A llama-architecture GGUF file -> a plain Hugging Face folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json), with the `gguf` package.

    GGUF                          Hugging Face
    token_embd.weight             model.embed_tokens.weight
    blk.{i}.attn_norm / ffn_norm  model.layers.{i}.input_layernorm / post_attention_layernorm
    blk.{i}.attn_q / attn_k       self_attn.q_proj / k_proj   (rows un-permuted, see below)
    blk.{i}.attn_v / attn_output  self_attn.v_proj / o_proj
    blk.{i}.ffn_gate/up/down      mlp.gate_proj / up_proj / down_proj
    output_norm / output          model.norm / lm_head (no output: tied to the embedding)

Weights are dequantized to float32, exactly the values transformers' own GGUF loader makes.
llama.cpp's converter interleaves each q/k head's two rotary halves (row r of a head's
[2, d/2] halves becomes [d/2, 2]); undoing it restores the Hugging Face row order. The GPT-2
style BPE tokenizer is rebuilt from the file's tokens and merges the way transformers' GGUF
converter builds it, its control tokens (type 3) as special tokens. Same bytes every run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
CONTROL_TOKEN = 3  # gguf's token type of special tokens


def convert_gguf(gguf_path: Path, out_dir: Path,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Writes the Hugging Face folder of a llama GGUF into out_dir; progress(done, total)."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}; "
                         "only llama GGUF files convert")
    config = hf_config(meta)
    tensors = {}
    for i, tensor in enumerate(reader.tensors):
        name = hf_name(tensor.name)
        weight = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary_rows(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)
        if progress is not None:
            progress(i + 1, len(reader.tensors))
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))
    return out_dir


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    block, index, part, kind = gguf_name.split(".")  # blk.{i}.{part}.weight
    if block != "blk" or part not in _LAYER_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{index}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """[heads · d, in] rows of each head in llama.cpp's order [d/2, 2] -> Hugging Face's [2, d/2]."""
    rows_per_half = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, rows_per_half, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def hf_config(meta: dict) -> dict:
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id",
                                     meta["tokenizer.ggml.eos_token_id"])),
        "torch_dtype": "float32",
    }


def build_tokenizer(meta: dict):
    """The byte-level BPE of a GGUF with tokenizer.ggml.model == "gpt2"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only gpt2 "
                         "(byte-level BPE) GGUF tokenizers convert")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta["tokenizer.ggml.token_type"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN])
    return tokenizer


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(key)
        return None if index is None else tokens[int(index)]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": int(meta["llama.context_length"]),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")

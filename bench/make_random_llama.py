"""Writes a Llama-shaped checkpoint with random weights (and the tiny model's tokenizer), for
speed measurements of real model sizes where no real weights can be downloaded.

    python bench/make_random_llama.py --shape 1b|8b --out DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from services.model.default_model import ensure_default_model  # noqa: E402

SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         torch_dtype=a.dtype, **SHAPES[a.shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, a.dtype))
    out = Path(a.out)
    model.save_pretrained(out)
    tiny = ensure_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny / name, out / name)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")


if __name__ == "__main__":
    main()

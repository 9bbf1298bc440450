"""Builds one rank's model and fills it from a Hugging Face safetensors checkpoint.

Each parameter reads only its own rows/columns through `safe_open(...).get_slice(name)[a:b]`;
tensors of layers outside `layer_range` are never opened. The model is built on the meta device
first, so no memory is touched twice.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from services.model.config import ModelConfig
from services.model.llama import LlamaForCausalLM
from services.model.parallel import ParallelContext, stage_layer_range
from services.progress import Progress

log = logging.getLogger("meshserve.model")

INDEX_FILE = "model.safetensors.index.json"


def load_model(
    model_dir: str | Path,
    ctx: ParallelContext,
    layer_range: range | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    if layer_range is None:
        layer_range = stage_layer_range(config.num_hidden_layers, ctx.pp_size, ctx.pp_rank)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, ctx, layer_range)
    model.to(dtype=dtype).to_empty(device=device)
    if model.lm_head_shares_embedding:  # to_empty unties parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    sources = list(model.weight_sources())
    with torch.no_grad(), ExitStack() as files, \
            Progress(f"loading {model_dir.name}", len(sources), "tensors", log) as progress:
        reader = CheckpointReader(model_dir, files)
        for name, layer, param_name, shard_id in sources:
            layer.load_slice(param_name, reader.get_slice(name), shard_id)
            progress.update()
    return model.eval().requires_grad_(False)


class CheckpointReader:
    """Maps a tensor name to its safetensors file and hands out lazy slices of it."""

    def __init__(self, model_dir: Path, files: ExitStack):
        self.model_dir = model_dir
        self.files = files
        self.file_of = _tensor_files(model_dir)  # tensor name -> file name
        self.handles: dict[str, object] = {}

    def get_slice(self, name: str):
        if name not in self.file_of:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in self.file_of:
                return self.get_slice("model.embed_tokens.weight")  # tied in the checkpoint
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        file_name = self.file_of[name]
        if file_name not in self.handles:
            path = self.model_dir / file_name
            self.handles[file_name] = self.files.enter_context(safe_open(str(path), framework="pt"))
        return self.handles[file_name].get_slice(name)


def _tensor_files(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.exists():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; point the model path at a HF checkpoint folder")
    file_of = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            file_of.update({name: path.name for name in f.keys()})
    return file_of

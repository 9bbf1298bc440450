"""Llama-family model for one TP rank of one pipeline stage: TP layers, paged attention, loader,
sampler, and the default tiny checkpoint. Knows nothing of gRPC.

Names are imported on first use (PEP 562), so torch-free parts (config.py, cache.py) can be
imported without loading torch: the gateway reads model configs and never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AttentionMetadata": "services.model.attention",
    "allocate_kv_caches": "services.model.attention",
    "build_attention_metadata": "services.model.attention",
    "kv_bytes_per_block": "services.model.attention",
    "count_collectives": "services.model.comm",
    "tp_all_gather": "services.model.comm",
    "tp_all_reduce": "services.model.comm",
    "ModelConfig": "services.model.config",
    "DEFAULT_MODEL_NAME": "services.model.default_model",
    "default_model_dir": "services.model.default_model",
    "ensure_default_model": "services.model.default_model",
    "write_tiny_checkpoint": "services.model.default_model",
    "LlamaForCausalLM": "services.model.llama",
    "load_model": "services.model.loader",
    "ParallelContext": "services.model.parallel",
    "close_tp_group": "services.model.parallel",
    "init_tp_group": "services.model.parallel",
    "stage_layer_range": "services.model.parallel",
    "SamplingOptions": "services.model.sampler",
    "sample": "services.model.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value

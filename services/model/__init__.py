"""Llama-family model for one TP rank of one pipeline stage: TP layers, paged attention, loader,
sampler, and the default tiny checkpoint. Knows nothing of gRPC."""

from services.model.attention import (
    AttentionMetadata,
    allocate_kv_caches,
    build_attention_metadata,
    kv_bytes_per_block,
)
from services.model.comm import count_collectives, tp_all_gather, tp_all_reduce
from services.model.config import ModelConfig
from services.model.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    ensure_default_model,
    write_tiny_checkpoint,
)
from services.model.llama import LlamaForCausalLM
from services.model.loader import load_model
from services.model.parallel import ParallelContext, close_tp_group, init_tp_group, stage_layer_range
from services.model.sampler import SamplingOptions, sample

__all__ = [
    "DEFAULT_MODEL_NAME",
    "AttentionMetadata",
    "LlamaForCausalLM",
    "ModelConfig",
    "ParallelContext",
    "SamplingOptions",
    "allocate_kv_caches",
    "build_attention_metadata",
    "close_tp_group",
    "count_collectives",
    "default_model_dir",
    "ensure_default_model",
    "init_tp_group",
    "kv_bytes_per_block",
    "load_model",
    "sample",
    "stage_layer_range",
    "tp_all_gather",
    "tp_all_reduce",
    "write_tiny_checkpoint",
]

"""Settings of one worker process, built once in main from flags (the Helm values map 1:1)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from services.arg_types import NON_NEGATIVE, PORT, POSITIVE, SECONDS, float_in, int_at_least


@dataclass(frozen=True)
class WorkerSettings:
    model: str  # HF-format folder; "" = the built-in default model
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dist_init: str = ""  # torch.distributed init method of this stage's TP group (tcp://h:p)
    host: str = "127.0.0.1"
    port: int = 0
    step_port: int = 0  # the scheduler's step stream (services/step/link.py); 0 = any free port
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU
    block_size: int = 16
    num_kv_blocks: int = 0  # 0 = from kv_cache_memory_gb
    kv_cache_memory_gb: float = 0.0  # 0 = 0.0625 GB on CPU, 85 % of free memory on GPU
    layer_split: tuple[int, ...] = ()  # layers per stage; () = balanced
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    num_threads: int = 1  # torch threads on CPU
    ready_file: str = ""  # where to write host:port once serving
    max_num_seqs: int = 256  # live sequences held at once; also the largest CUDA-graph batch
    attention_backend: str = "auto"  # auto = triton on CUDA, torch on CPU
    enforce_eager: bool = False  # no CUDA graphs (vLLM's flag)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory this worker may fill
    drain_timeout_s: float = 60.0  # on SIGTERM, serve the scheduler's steps this long at most
    metrics_port: int = -1  # Prometheus /metrics on this port; 0 = any free port; -1 = none
    num_speculative_tokens: int = 0  # proposals per sequence the scheduler verifies per step
    draft_model: str = ""  # speculative method draft_model: the draft the sampling rank runs

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> WorkerSettings:
        p = argparse.ArgumentParser(prog="meshserve worker",
                                    description="One worker: a TP shard of one PP stage.")
        p.add_argument("--model", default="", help="HF-format model folder (default: tiny model)")
        p.add_argument("--tp-rank", type=NON_NEGATIVE, default=0)
        p.add_argument("--tp-size", "--tensor-parallel-size", type=POSITIVE, default=1)
        p.add_argument("--pp-rank", type=NON_NEGATIVE, default=0)
        p.add_argument("--pp-size", "--pipeline-parallel-size", type=POSITIVE, default=1)
        p.add_argument("--dist-init", default="",
                       help="init method of this stage's TP group, e.g. tcp://10.0.0.1:29500")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=PORT, default=0)
        p.add_argument("--step-port", type=PORT, default=0,
                       help="port of the scheduler's step stream (0 = any free one; Describe "
                            "tells the scheduler which)")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--block-size", type=POSITIVE, default=16)
        p.add_argument("--num-kv-blocks", type=NON_NEGATIVE, default=0)
        p.add_argument("--kv-cache-memory-gb", type=float_in(0.0, low_open=False), default=0.0)
        p.add_argument("--layer-split", default="", help="layers per stage, e.g. 10,12,10")
        p.add_argument("--max-model-len", type=NON_NEGATIVE, default=0)
        p.add_argument("--num-threads", type=POSITIVE, default=1)
        p.add_argument("--ready-file", default="", help="write host:port here once serving")
        p.add_argument("--max-num-seqs", type=POSITIVE, default=256,
                       help="live sequences held at once; the largest CUDA-graph batch")
        p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                       help="auto: triton kernels on CUDA, the plain-torch reference on CPU")
        p.add_argument("--enforce-eager", action="store_true",
                       help="run every step eagerly (no CUDA graphs)")
        p.add_argument("--gpu-memory-utilization", type=float_in(0.0, 1.0), default=0.9,
                       help="share of the GPU's memory for weights, graphs and the KV cache")
        p.add_argument("--drain-timeout", type=SECONDS, default=60.0,
                       help="seconds a worker told to stop keeps serving its scheduler's steps "
                            "(the scheduler drains too); it exits as soon as the scheduler leaves")
        p.add_argument("--metrics-port", type=int_at_least(-1), default=-1,
                       help="Prometheus /metrics on this port (0 = any free port, -1 = none)")
        p.add_argument("--num-speculative-tokens", type=NON_NEGATIVE, default=0,
                       help="the scheduler's speculative num_speculative_tokens: CUDA graphs "
                            "are captured for its verification steps too (0 = none)")
        p.add_argument("--draft-model", default="",
                       help="speculative method draft_model: the draft's checkpoint folder; the "
                            "last stage's TP rank 0 runs it and proposes "
                            "--num-speculative-tokens tokens a step")
        a = p.parse_args(argv)
        split = tuple(int(x) for x in a.layer_split.split(",") if x)
        settings = cls(a.model, a.tp_rank, a.tp_size, a.pp_rank, a.pp_size, a.dist_init, a.host,
                       a.port, a.step_port, a.device, a.dtype, a.block_size, a.num_kv_blocks,
                       a.kv_cache_memory_gb, split, a.max_model_len, a.num_threads,
                       a.ready_file, a.max_num_seqs, a.attention_backend, a.enforce_eager,
                       a.gpu_memory_utilization, a.drain_timeout, a.metrics_port,
                       a.num_speculative_tokens, a.draft_model)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise SystemExit(f"--tp-rank {self.tp_rank} must be in [0, --tp-size {self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise SystemExit(f"--pp-rank {self.pp_rank} must be in [0, --pp-size {self.pp_size})")
        if self.tp_size > 1 and not self.dist_init:
            raise SystemExit("--tp-size > 1 needs --dist-init tcp://HOST:PORT (same for the "
                             "stage's TP ranks)")
        if self.block_size < 1:
            raise SystemExit("--block-size must be >= 1")
        if self.max_num_seqs < 1:
            raise SystemExit("--max-num-seqs must be >= 1")
        if self.draft_model and self.num_speculative_tokens < 1:
            raise SystemExit("--draft-model needs --num-speculative-tokens K >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SystemExit("--gpu-memory-utilization must be in (0, 1]")

"""What one worker holds: its TP shard of its PP stage's layers, their KV cache, and the
stage links to its neighbours.

    stage 0               stage 1                 ...   stage P-1
    rank 0 ── UCX ──────► rank 0 ── UCX ──────►         rank 0 (samples, answers)
    rank 1 ── UCX ──────► rank 1 ── UCX ──────►         rank 1
     (TP group: NCCL/gloo)  (TP group)                   (TP group)

With TP = T each rank sends only its 1/T column slice of the residual stream; the receiving
stage all-gathers it inside its TP group, so a link carries the hidden state once, not T times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meshserve.internal.v1 import worker_pb2 as pb
from services.model import (ModelConfig, ParallelContext, allocate_kv_caches, ensure_default_model,
                            init_tp_group, kv_bytes_per_block, load_model, stage_layer_range)
from services.stagelink.wire import ActivationHeader  # importing it needs no UCX
from services.step import StepPlan
from services.worker.cuda_graphs import bucket_sizes, verify_bucket_sizes
from services.worker.draft import DraftProposer
from services.worker.runner import ModelRunner
from services.worker.settings import WorkerSettings

log = logging.getLogger("meshserve.worker")

CPU_KV_CACHE_GB = 0.0625


@dataclass
class LinkStats:
    """What the stage link carried for this rank since it started (the worker's metrics)."""

    sent_bytes: int = 0
    send_s: float = 0.0  # awaiting the link's send (the transfer, with any queueing in it)
    received_bytes: int = 0
    receive_wait_s: float = 0.0  # awaiting the previous stage's activation (its compute too)


@dataclass
class WorkerShard:
    settings: WorkerSettings
    config: ModelConfig
    model_name: str
    ctx: ParallelContext
    device: torch.device
    runner: ModelRunner
    num_kv_blocks: int
    max_model_len: int
    link: object | None = None  # StageLink when PP > 1
    proposer: DraftProposer | None = None  # the draft model's, on the sampling rank
    link_address: bytes = b""
    _sends: asyncio.Queue | None = None
    _sender: asyncio.Task | None = None
    link_stats: LinkStats = field(default_factory=LinkStats)
    # bytes this rank holds: "weights", "kv_cache", and "cuda_graphs" once they are captured
    memory: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, s: WorkerSettings) -> WorkerShard:
        model_dir = Path(s.model) if s.model else ensure_default_model()
        config = ModelConfig.from_dir(model_dir)
        device = _pick_device(s.device, s.pp_rank * s.tp_size + s.tp_rank)
        dtype = _pick_dtype(s.dtype, device)
        if s.tp_size > 1:
            ctx = init_tp_group(s.dist_init, s.tp_rank, s.tp_size, s.pp_rank, s.pp_size)
        else:
            ctx = ParallelContext(pp_rank=s.pp_rank, pp_size=s.pp_size)
        layers = stage_layer_range(config.num_hidden_layers, s.pp_size, s.pp_rank,
                                   list(s.layer_split) or None)
        model = load_model(model_dir, ctx, layers, dtype=dtype, device=device)
        max_len = s.max_model_len or config.max_context_len
        backend = _pick_backend(s.attention_backend, device)
        graph_sizes = () if (s.enforce_eager or device.type != "cuda" or backend != "triton") \
            else bucket_sizes(s.max_num_seqs)
        runner_args = dict(max_num_seqs=s.max_num_seqs, max_model_len=max_len,
                           attention_backend=backend, verify_len=1 + s.num_speculative_tokens)
        reserve = _activation_reserve(model, config, ctx, len(layers), s, dtype, device,
                                      runner_args, graph_sizes)
        draft = _load_draft(s, config, dtype, device) \
            if s.draft_model and ctx.is_last_stage and ctx.tp_rank == 0 else None
        # The draft's KV pool holds as many blocks as the target's: it takes its share of memory.
        draft_per_block = 0 if draft is None else kv_bytes_per_block(
            draft.config, draft.ctx, draft.config.num_hidden_layers, s.block_size, dtype)
        num_blocks = s.num_kv_blocks or _blocks_for_memory(s, config, ctx, len(layers), dtype,
                                                           device, reserve, draft_per_block)
        # One block more than the scheduler sees: the scratch block of padded graph rows.
        caches = allocate_kv_caches(config, ctx, len(layers), num_blocks + 1, s.block_size,
                                    dtype, device)
        runner = ModelRunner(model, caches, s.block_size, device, ctx,
                             cuda_graph_sizes=graph_sizes, **runner_args)
        graphs = runner.graphs
        log.info("worker: %s attention, %s", backend,
                 f"CUDA graphs for batches {graph_sizes[0]}..{graph_sizes[-1]}" if graph_sizes
                 else "eager steps")
        if graphs is not None and graphs.verify_sizes:
            log.info("worker: CUDA graphs for verification steps of %d..%d sequences x %d tokens",
                     graphs.verify_sizes[0], graphs.verify_sizes[-1], graphs.verify_len)
        shard = cls(s, config, model_dir.name, ctx, device, runner, num_blocks, max_len)
        if draft is not None:
            draft_caches = allocate_kv_caches(draft.config, draft.ctx,
                                              draft.config.num_hidden_layers, num_blocks + 1,
                                              s.block_size, dtype, device)
            draft_runner = ModelRunner(draft, draft_caches, s.block_size, device, draft.ctx,
                                       cuda_graph_sizes=graph_sizes,
                                       **dict(runner_args, verify_len=1))
            shard.proposer = DraftProposer(draft_runner, num_blocks, s.block_size,
                                           s.num_speculative_tokens, max_len)
            log.info("worker: draft model %s proposes %d tokens a step", s.draft_model,
                     s.num_speculative_tokens)
        shard.memory = {
            "weights": sum(t.numel() * t.element_size()
                           for t in [*model.parameters(), *model.buffers()]),
            "kv_cache": sum(c.numel() * c.element_size() for c in caches)}
        return shard

    def capture_graphs(self, progress=None) -> None:
        """Captures the decode graphs (on the model thread) and records their memory."""
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.runner.capture_graphs(progress)
        if self.proposer is not None:
            self.proposer.runner.capture_graphs()
        if self.device.type == "cuda":
            self.memory["cuda_graphs"] = torch.cuda.memory_allocated(self.device) - before

    @property
    def is_first_stage(self) -> bool:
        return self.ctx.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.ctx.is_last_stage

    @property
    def is_sampler(self) -> bool:
        return self.ctx.is_last_stage and self.ctx.tp_rank == 0

    def describe(self) -> pb.DescribeResponse:
        c = self.ctx
        return pb.DescribeResponse(
            model=self.model_name, tp_rank=c.tp_rank, tp_size=c.tp_size, pp_rank=c.pp_rank,
            pp_size=c.pp_size, num_kv_blocks=self.num_kv_blocks,
            block_size=self.settings.block_size, max_model_len=self.max_model_len,
            eos_token_ids=list(self.config.eos_token_ids), stage_link_address=self.link_address,
            vocab_size=self.config.vocab_size, max_num_seqs=self.settings.max_num_seqs)

    # -- stage links (PP > 1) ------------------------------------------------------------

    async def start_stage_link(self) -> None:
        if self.ctx.pp_size == 1:
            return
        from services.stagelink import StageLink  # UCX is needed only with PP

        self.link = StageLink(device=self.device)
        self.link_address = await self.link.start()

    async def connect_next_stage(self, address: bytes) -> None:
        if self._sender is not None:  # a new scheduler: drop what the old one left queued
            self._sender.cancel()
        await self.link.connect(address)
        self._sends = asyncio.Queue()
        self._sender = asyncio.create_task(self._send_loop())

    async def receive_activations(self, plan: StepPlan) -> torch.Tensor:
        started = time.perf_counter()
        hidden = await receive_for(self.link, plan)
        self.link_stats.received_bytes += hidden.numel() * hidden.element_size()
        self.link_stats.receive_wait_s += time.perf_counter() - started
        return hidden

    async def send_activations(self, plan: StepPlan, hidden: torch.Tensor) -> None:
        """Queues this rank's slice of the residual stream for the next stage, in order."""
        if self.ctx.tp_size > 1:
            width = hidden.shape[-1] // self.ctx.tp_size
            hidden = hidden[:, self.ctx.tp_rank * width:(self.ctx.tp_rank + 1) * width]
        hidden = hidden.contiguous()
        header = ActivationHeader(plan.step_id, plan.micro_batch, tuple(hidden.shape),
                                  str(hidden.dtype).removeprefix("torch."),
                                  meta=plan.epoch.to_bytes(8, "little"))
        self._sends.put_nowait((header, hidden))

    async def _send_loop(self) -> None:
        while True:
            header, hidden = await self._sends.get()
            started = time.perf_counter()
            await self.link.send(header, hidden)
            self.link_stats.sent_bytes += hidden.numel() * hidden.element_size()
            self.link_stats.send_s += time.perf_counter() - started

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self.link is not None:
            await self.link.close()


async def receive_for(link, plan: StepPlan) -> torch.Tensor:
    """The previous stage's activation for plan. Activations of another epoch were sent for a
    scheduler that has been replaced since (killed between writing a plan to one stage and to
    the next): nothing will consume them, so they are dropped."""
    while True:
        header, hidden = await link.recv()
        if int.from_bytes(header.meta, "little") == plan.epoch:
            break
        log.warning("dropping step %d of an earlier scheduler", header.step_id)
    if header.step_id != plan.step_id:
        raise RuntimeError(f"stage link delivered step {header.step_id}, "
                           f"plan is step {plan.step_id}")
    return hidden


def _pick_device(name: str, local_index: int) -> torch.device:
    """auto: one GPU per worker of the host (stage-major), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = f"cuda:{local_index % torch.cuda.device_count()}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(device)  # before the NCCL group is made
    return device


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _pick_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("triton is not installed: plain-torch attention, no CUDA graphs")
        return "torch"
    return "triton"


def _activation_reserve(model, config, ctx, num_layers, s: WorkerSettings, dtype, device,
                        runner_args, graph_sizes) -> int:
    """GPU bytes to leave beside the KV pool: the peak of one eager decode step of the largest
    graph batch (the graphs' shared pool holds about that; with speculation, of the largest
    verification step too), measured on a two-block cache, twice over for the eager prefill
    steps' own peaks. This also compiles the kernels once."""
    if device.type != "cuda" or not graph_sizes:
        return 0
    probe_caches = allocate_kv_caches(config, ctx, num_layers, 2, s.block_size, dtype, device)
    largest = sorted({graph_sizes[-1],
                      *verify_bucket_sizes(graph_sizes, runner_args["verify_len"])[-1:]})
    probe = ModelRunner(model, probe_caches, s.block_size, device, ctx,
                        cuda_graph_sizes=tuple(largest), **runner_args)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe.graphs.warm_up(graph_sizes[-1])
    if probe.graphs.verify_sizes:
        probe.graphs.warm_up(probe.graphs.verify_sizes[-1], probe.graphs.verify_len)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del probe, probe_caches
    torch.cuda.empty_cache()
    return 2 * peak


def _load_draft(s: WorkerSettings, config: ModelConfig, dtype, device):
    """The draft model, whole on this rank (no TP, no PP); it must speak the target's vocabulary."""
    draft_config = ModelConfig.from_dir(s.draft_model)
    if draft_config.vocab_size != config.vocab_size:
        raise SystemExit(f"--draft-model {s.draft_model} has a vocabulary of "
                         f"{draft_config.vocab_size}, the model {config.vocab_size}: a draft must "
                         "share the target's tokenizer")
    return load_model(s.draft_model, ParallelContext(), dtype=dtype, device=device)


def _blocks_for_memory(s: WorkerSettings, config, ctx, num_layers, dtype, device,
                       reserve: int = 0, extra_per_block: int = 0) -> int:
    per_block = kv_bytes_per_block(config, ctx, num_layers, s.block_size, dtype) + extra_per_block
    if s.kv_cache_memory_gb:
        budget = s.kv_cache_memory_gb * 2**30
    elif device.type == "cuda":
        # vLLM's rule: this process fills at most that share of the GPU (weights included).
        free, total = torch.cuda.mem_get_info(device)
        mine = total * s.gpu_memory_utilization - torch.cuda.memory_allocated(device)
        budget = min(free, mine) - reserve
    else:
        budget = CPU_KV_CACHE_GB * 2**30
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise SystemExit(f"KV cache budget of {budget / 2**20:.0f} MiB holds no block of "
                         f"{per_block / 2**20:.1f} MiB: raise --kv-cache-memory-gb")
    return num_blocks

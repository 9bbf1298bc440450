"""GPU decode speed, every row side by side in one run: the bandwidth roofline, transformers'
fast path (static cache + compiled decode step), meshserve's worker in process (eager plain-torch
attention, eager Triton attention, CUDA graphs) and meshserve served through the gateway.

    python bench/bench_decode.py [--shapes 1b,8b] [--batches 1,16,64] [--parts hf,exact,runner,served]
                                 [--modes ...] [--profile [--profile-mode M]] [--api-servers 1,4]
                                 [--inflight 2,3] [--linear-table FILE]

Random-weight checkpoints of Llama 3.2 1B and Llama 3.1 8B shapes are written on first use
(bench/make_random_llama.py). Decode-only time per step: transformers' is the difference between
a 128-token and an 8-token `generate` (prefill cancels out); meshserve's is the time between the
results of consecutive decode steps once every prompt is in. Prints markdown for RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import itertools
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import drive, machine  # noqa: E402
from services.model.config import ModelConfig  # noqa: E402
from services.model.triton_pdl import PREFETCH_KV  # noqa: E402

CONTEXT = 128  # prompt tokens per sequence
STEPS = 128  # decode steps timed (transformers: generate 128 vs 8 tokens)


class Mode(NamedTuple):
    """One in-process mode: the worker's flags, and which of the model's GPU kernels run."""
    worker: dict
    fused: bool  # the fused Triton kernels (norms, SiLU x mul, rotary)
    skinny: bool  # the measured table's Triton products (skinny matmuls, batch-1 GEMVs)
    pdl: bool = True  # Triton kernels launched with programmatic dependent launch (triton_pdl)
    silu_epilogue: bool = True  # gate/up with SiLU x up in its epilogue at 2-64 rows
    prefetch_kv: bool = False  # decode attention asks L2 for its first K/V tile before its wait
    other_table: bool = False  # the products' tiles from --linear-table instead of the shipped one
    qkv_rope: bool = True  # qkv with the rotary and the cache write in its epilogue at 2-64 rows
    rotary_in_attention: bool = True  # decode attention rotates q, k and writes the cache itself
    argmax_epilogue: bool = True  # the LM head takes the greedy ids in its epilogue


EAGER = dict(enforce_eager=True)
GRAPHS = dict(enforce_eager=False)
TORCH, TRITON = dict(attention_backend="torch"), dict(attention_backend="triton")
MODES = {
    "eager, torch attention, unfused": Mode(TORCH | EAGER, False, False),
    "eager, triton attention": Mode(TRITON | EAGER, True, True),
    "CUDA graphs, triton, unfused": Mode(TRITON | GRAPHS, False, False),
    "CUDA graphs, triton + fused, cuBLAS": Mode(TRITON | GRAPHS, True, False),
    "CUDA graphs, triton, no PDL": Mode(TRITON | GRAPHS, True, True, pdl=False),
    "CUDA graphs, triton, SiLU apart": Mode(TRITON | GRAPHS, True, True, silu_epilogue=False),
    "CUDA graphs, triton, K/V prefetch": Mode(TRITON | GRAPHS, True, True, prefetch_kv=True),
    "CUDA graphs, triton, --linear-table": Mode(TRITON | GRAPHS, True, True, other_table=True),
    "CUDA graphs, triton, --linear-table, rotary apart": Mode(TRITON | GRAPHS, True, True,
                                                              other_table=True, qkv_rope=False),
    "CUDA graphs, triton, rotary and argmax apart": Mode(TRITON | GRAPHS, True, True,
                                                          rotary_in_attention=False,
                                                          argmax_epilogue=False),
    "CUDA graphs, triton, rotary apart": Mode(TRITON | GRAPHS, True, True,
                                              rotary_in_attention=False),
    "CUDA graphs, triton": Mode(TRITON | GRAPHS, True, True),
}
MODE_KEYS = dict(zip(["torch", "triton", "graphs-unfused", "graphs-cublas", "graphs-nopdl",
                      "graphs-nosilu", "graphs-kvprefetch", "graphs-table",
                      "graphs-table-norope", "graphs-apart", "graphs-rotary-apart",
                      "graphs"],
                     MODES))
LINEAR_TABLE = None  # --linear-table: a measured table of product tiles for graphs-table


def checkpoint(shape: str, root: Path) -> Path:
    path = root / f"llama-{shape}"
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_random_llama.py"),
                        "--shape", shape, "--out", str(path)], check=True)
    return path


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    x = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3)


def roofline_ms(model_dir: Path, batch: int, bandwidth: float) -> float:
    """Weights once plus every sequence's KV (at the mean context of the timed steps)."""
    c = ModelConfig.from_dir(model_dir)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * batch * (
        CONTEXT + STEPS / 2)
    return (weights + kv) / bandwidth * 1e3


# -- transformers ------------------------------------------------------------------------------

def hf_step_ms(model_dir: Path, batches: list[int]) -> dict[int, float]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.cache_implementation = "static"
    out = {}
    for batch in batches:
        ids = torch.randint(3, 32000, (batch, CONTEXT), device="cuda")

        def run(n: int) -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        run(STEPS), run(8)  # compiles
        long, short = min(run(STEPS) for _ in range(2)), min(run(8) for _ in range(2))
        out[batch] = (long - short) / (STEPS - 8) * 1e3
    return out  # the model is freed with this frame


# -- meshserve in process -----------------------------------------------------------------------

def load_shard(model_dir: Path, max_num_seqs: int, **flags):
    from services.worker.settings import WorkerSettings
    from services.worker.shard import WorkerShard

    settings = WorkerSettings(model=str(model_dir), max_num_seqs=max_num_seqs,
                              kv_cache_memory_gb=8.0, **flags)
    shard = WorkerShard.load(settings)
    shard.runner.capture_graphs()
    return shard


def step_ms(times: list[float], skip: int = 8) -> float:
    """Median time between consecutive results past the prefill and warm-up steps."""
    gaps = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    return statistics.median(gaps) * 1e3


def prompts_for(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 32000), (batch, CONTEXT), generator=g).tolist()


def runner_rows(model_dir: Path, batches: list[int], profile: str, modes: list[str]) -> dict:
    """ms per decode step of each mode at each batch; the profile of mode `profile` (a MODES
    name, or "" for none) at batch 1 and the largest."""
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    from services.model import attention, layers, triton_linear, triton_pdl

    shipped_table = triton_linear.CONFIG_FILE
    out = {}
    for mode in modes:
        m = MODES[mode]
        triton_pdl.ENABLED, layers.FUSED_GATE_UP_SILU = m.pdl, m.silu_epilogue
        triton_pdl.PREFETCH_KV, layers.FUSED_QKV_ROPE = m.prefetch_kv, m.qkv_rope
        attention.ROTARY_IN_DECODE, layers.FUSED_LM_HEAD_ARGMAX = (m.rotary_in_attention,
                                                                   m.argmax_epilogue)
        triton_linear.CONFIG_FILE = LINEAR_TABLE if m.other_table else shipped_table
        # the cuBLAS modes run every product on cuBLAS: no skinny tiles, no fused GEMVs
        layers.FUSED_KERNELS, layers.SKINNY_MATMULS, layers.FUSED_GEMVS = m.fused, m.skinny, m.skinny
        shard = load_shard(model_dir, max(batches), **m.worker)
        for batch in batches:
            times, _ = drive(shard.runner, shard.num_kv_blocks, prompts_for(batch, vocab),
                             STEPS)
            out[(mode, batch)] = step_ms(times)
            print(f"  {mode}, batch {batch}: {out[(mode, batch)]:.3f} ms/step", flush=True)
        if mode == profile:
            for batch in (1, max(batches)):
                print(profile_table(shard, batch, vocab), flush=True)
        del shard
        torch.cuda.empty_cache()
    layers.FUSED_KERNELS = layers.SKINNY_MATMULS = layers.FUSED_GEMVS = triton_pdl.ENABLED = True
    layers.FUSED_GATE_UP_SILU = layers.FUSED_QKV_ROPE = True
    triton_pdl.PREFETCH_KV = PREFETCH_KV
    attention.ROTARY_IN_DECODE = layers.FUSED_LM_HEAD_ARGMAX = True
    triton_linear.CONFIG_FILE = shipped_table
    return out


def profile_table(shard, batch: int, vocab: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        times, _ = drive(shard.runner, shard.num_kv_blocks, prompts_for(batch, vocab), 40)
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="device_time_total", row_limit=18)
    except (AttributeError, KeyError, ValueError):
        table = averages.table(sort_by="cuda_time_total", row_limit=18)
    return f"\n#### profile, CUDA graphs, batch {batch} ({step_ms(times):.3f} ms/step)\n\n{table}"


def exactness_with_table(model_dir: Path) -> list[str]:
    """exactness() with the products' tiles of --linear-table where one is given (the table under
    test), else of the shipped table."""
    from services.model import triton_linear

    shipped = triton_linear.CONFIG_FILE
    triton_linear.CONFIG_FILE = LINEAR_TABLE or shipped
    try:
        return [f"products' tiles from {triton_linear.CONFIG_FILE.name}"] + exactness(model_dir)
    finally:
        triton_linear.CONFIG_FILE = shipped


def exactness(model_dir: Path) -> list[str]:
    """bf16 logits of a prefill: Triton attention + fused kernels against the plain-torch
    reference, both against float32 (the bf16 error); then greedy ids through the served step
    path, CUDA graphs against the same steps run eagerly (same buckets: bit-identical expected),
    and the full fast path against the eager plain-torch cuBLAS reference, where a first
    difference must be a near tie (bench/gpu_check.py's rule): the two tokens' float32 logits,
    after the reference's tokens so far, differ by no more than the measured bf16 error."""
    from services.model import layers

    config = ModelConfig.from_dir(model_dir)
    prompts = prompts_for(4, config.vocab_size, seed=1)
    logits = {}
    for name, dtype, backend, fused in [("fp32", torch.float32, "torch", False),
                                        ("torch bf16", torch.bfloat16, "torch", False),
                                        ("triton bf16", torch.bfloat16, "triton", True)]:
        layers.FUSED_KERNELS = fused
        logits[name] = torch.cat(prefill_logits(model_dir, dtype, backend, prompts, last=False))
    layers.FUSED_KERNELS = True

    def diff(a, b):
        return (logits[a] - logits[b]).abs().max().item()

    def agree(a, b):
        return (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean().item()

    bf16_error = diff("torch bf16", "fp32")
    lines = [f"prefill logits of 4 x {CONTEXT} positions, max |diff|: triton+fused vs torch bf16 "
             f"{diff('triton bf16', 'torch bf16'):.4f}; vs fp32: triton {diff('triton bf16', 'fp32'):.4f}, "
             f"torch bf16 {bf16_error:.4f} (the bf16 error); greedy argmax agreeing "
             f"with fp32: triton {agree('triton bf16', 'fp32'):.1%}, torch bf16 "
             f"{agree('torch bf16', 'fp32'):.1%}"]
    del logits
    graphed = load_shard(model_dir, 8, attention_backend="triton", enforce_eager=False)
    _, graph_ids = drive(graphed.runner, graphed.num_kv_blocks, prompts, 32)
    replays = graphed.runner.graphs.num_replays
    del graphed
    eager = load_shard(model_dir, 8, attention_backend="triton", enforce_eager=True)
    _, eager_ids = drive(eager.runner, eager.num_kv_blocks, prompts, 32)
    del eager
    torch.cuda.empty_cache()
    same = sum(graph_ids[i] == eager_ids[i] for i in graph_ids)
    lines.append(f"greedy ids, 4 sequences x 32 tokens, CUDA graphs ({replays} replays) vs eager "
                 f"(both triton): {same}/4 sequences identical")
    layers.FUSED_KERNELS = layers.SKINNY_MATMULS = False
    reference = load_shard(model_dir, 8, attention_backend="torch", enforce_eager=True)
    _, reference_ids = drive(reference.runner, reference.num_kv_blocks, prompts, 32)
    layers.FUSED_KERNELS = layers.SKINNY_MATMULS = True
    del reference
    torch.cuda.empty_cache()
    firsts = {i: next((j for j, (a, b) in enumerate(zip(graph_ids[i], reference_ids[i]))
                       if a != b), None) for i in graph_ids}
    diverged = [i for i, j in firsts.items() if j is not None]
    contexts = [prompts[i] + reference_ids[i][:firsts[i]] for i in diverged]
    margins = [float(last[reference_ids[i][firsts[i]]] - last[graph_ids[i][firsts[i]]])
               for i, last in zip(diverged, prefill_logits(model_dir, torch.float32, "torch",
                                                           contexts) if contexts else [])]
    ties = sum(abs(m) <= bf16_error for m in margins)
    detail = ", ".join(f"seq {i} at step {firsts[i]}: fp32 margin {m:.3f}"
                       for i, m in zip(diverged, margins)) or "none"
    lines.append(f"greedy ids, 4 sequences x 32 tokens, CUDA graphs with every fast kernel vs the "
                 f"eager plain-torch, cuBLAS reference (bf16): {4 - len(diverged)}/4 identical; "
                 f"first differences: {detail}; {ties}/{len(diverged)} of them near ties "
                 f"(|margin| <= the bf16 error {bf16_error:.3f})")
    return lines


def prefill_logits(model_dir: Path, dtype: torch.dtype, backend: str, token_lists,
                   last: bool = True, device: str = "cuda") -> list[torch.Tensor]:
    """Float32 logits of one prefill of each token list (one model load): of its last position
    [vocab] each, or of every position [len, vocab] with last=False."""
    from services.model import ParallelContext, load_model
    from services.model.attention import allocate_kv_caches, build_attention_metadata

    config = ModelConfig.from_dir(model_dir)
    block_size = 16
    lens = [len(t) for t in token_lists]
    widths = [-(-n // block_size) for n in lens]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    tables = [list(range(s, s + w)) for s, w in zip(starts, widths)]
    out = []
    with torch.inference_mode():
        model = load_model(model_dir, ParallelContext(), dtype=dtype, device=device)
        caches = allocate_kv_caches(config, model.ctx, config.num_hidden_layers, sum(widths),
                                    block_size, dtype, device)
        positions, meta = build_attention_metadata(lens, lens, tables, block_size, device)
        meta.backend = backend
        ids = torch.tensor(sum((list(t) for t in token_lists), []), device=device)
        hidden = model(positions, meta, caches, input_ids=ids)  # [sum(lens), hidden]
        ends = torch.tensor(lens).cumsum(0).tolist()
        if last:
            rows = hidden[torch.tensor(ends, device=device) - 1]
            out = list(model.compute_logits(rows).float())
        else:
            out = [model.compute_logits(hidden[e - n:e]).float() for e, n in zip(ends, lens)]
        del model, caches
    torch.cuda.empty_cache()
    return out


# -- meshserve served -----------------------------------------------------------------------------

def served_stats(address: str, prompts, max_tokens: int, at_start=None,
                 door: str = "grpc") -> tuple[float, float, float]:
    """(inter-token latency ms, time per output token ms, generated tokens/s) of concurrent
    streaming Generate calls, from client processes enough that the clients are not what is
    measured (one Python process receives only some ten thousand messages a second).

    As vLLM's serving benchmark has them: the inter-token latency is the median of every gap
    between consecutive tokens of every stream (a message of k tokens after a gap g counts as k
    gaps of g / k), the time per output token the median over streams of (last - first token
    time) / (tokens - 1). A prefill that runs between two decode steps (a stream that joins
    late) is in the second and only in the tail of the first. at_start: called (on a thread)
    when the streams start. door: grpc (address: the gateway's gRPC port) or http (address:
    its HTTP port; streamed completions, each server-sent event counted as one token, as vLLM's
    serving benchmark counts them)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    num_clients = min(len(prompts), 4)
    shares = [prompts[i::num_clients] for i in range(num_clients)]
    start_at = time.time() + 6.0  # every client imported and warmed up by then
    if at_start is not None:
        threading.Timer(start_at - time.time(), at_start).start()
    with ProcessPoolExecutor(num_clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        streams = [r for share in pool.map(client_streams, [address] * num_clients, shares,
                                           [max_tokens] * num_clients, [start_at] * num_clients,
                                           [door] * num_clients)
                   for r in share]
    gaps = [gap for s in streams for gap in s[4]]
    itl = statistics.median(gaps) * 1e3
    tpot = statistics.median(s[0] for s in streams) * 1e3
    elapsed = max(s[3] for s in streams) - min(s[2] for s in streams)
    return itl, tpot, sum(s[1] for s in streams) / elapsed


def client_streams(address: str, prompts, max_tokens: int, start_at: float,
                   door: str = "grpc"):
    """In a client process: per stream (inter-token latency s, tokens, sent at, last at, gaps)."""
    streams = _http_client_streams if door == "http" else _client_streams
    return asyncio.run(streams(address, prompts, max_tokens, start_at))


def _stream_figures(stamps: list[tuple[float, int]], sent: float):
    """(inter-token latency s, tokens, sent at, last at, gaps) of one stream from its
    (arrival time, tokens so far) stamps."""
    n = stamps[-1][1]
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    gaps = [(t - t_before) / (k - k_before)
            for (t_before, k_before), (t, k) in zip(stamps, stamps[1:])
            for _ in range(k - k_before)]
    return (t1 - t0) / max(1, n1 - n0), n, sent, t1, gaps


WARM_UP_TOKENS = 4  # a short stream on each connection before the measured ones


async def _wait_until(start_at: float) -> None:
    """Sleeps until the streams' common start; a client that is late says so (its streams start
    after the others', which lowers the tokens/s of the run, not its latencies)."""
    late = time.time() - start_at
    if late > 0:
        print(f"  a client process was ready {late:.2f} s after the common start", flush=True)
    await asyncio.sleep(max(0.0, -late))


async def _http_client_streams(address: str, prompts, max_tokens: int, start_at: float):
    import aiohttp

    from bench.common import completion_events, served_model

    model = served_model(address)

    async def one(session, ids, num_tokens=max_tokens):
        sent, stamps, n = time.time(), [], 0
        async for event in completion_events(session, model, ids, num_tokens):
            if event["choices"]:
                n += 1
                stamps.append((time.time(), n))
            elif event.get("usage"):  # the last one: every token counted
                tokens = event["usage"]["completion_tokens"]
                stamps[-1] = (stamps[-1][0], max(n, tokens))
        return _stream_figures(stamps, sent)

    # Several connections' worth of sessions, as the gRPC clients open several channels.
    sessions = [aiohttp.ClientSession(f"http://{address}") for _ in range(4)]
    try:  # as many connections warm as there will be streams
        await asyncio.gather(*(one(sessions[i % len(sessions)], prompts[0][:16], WARM_UP_TOKENS)
                               for i in range(len(prompts))))
        await _wait_until(start_at)
        return await asyncio.gather(*(one(sessions[i % len(sessions)], p)
                                      for i, p in enumerate(prompts)))
    finally:
        for session in sessions:
            await session.close()


async def _client_streams(address: str, prompts, max_tokens: int, start_at: float):
    import grpc

    from meshserve.v1 import generation_pb2 as pb
    from meshserve.v1 import generation_pb2_grpc as pb_grpc

    from bench.common import OWN_CONNECTION

    # A connection per stream, as the HTTP clients open one per request: with --api-server-count
    # the kernel spreads connections over the gateways.
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in prompts]
    stubs = [pb_grpc.GenerationStub(c) for c in channels]

    async def one(stub, ids, num_tokens=max_tokens):
        sent, stamps, n = time.time(), [], 0
        call = stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(
            max_tokens=num_tokens, ignore_eos=True)))
        async for msg in call:
            n += len(msg.token_ids)
            stamps.append((time.time(), n))
        return _stream_figures(stamps, sent)

    await asyncio.gather(*(one(stub, prompts[0][:16], WARM_UP_TOKENS) for stub in stubs))
    await _wait_until(start_at)
    results = await asyncio.gather(*(one(stub, p) for stub, p in zip(stubs, prompts)))
    for channel in channels:
        await channel.close()
    return results


def served_rows(model_dir: Path, batches: list[int], api_servers: int = 1,
                inflight: int = 0, py_spy: str = "", door: str = "grpc") -> dict:
    from deploy.launcher import LocalMesh, MeshSpec

    vocab = ModelConfig.from_dir(model_dir).vocab_size
    n = str(max(batches))
    spec = MeshSpec(model=str(model_dir), port=0, api_server_count=api_servers,
                    worker_args=("--max-num-seqs", n, "--kv-cache-memory-gb", "8"),
                    scheduler_args=("--max-num-seqs", n, "--max-num-batched-tokens", "8192",
                                    "--max-inflight-steps", str(inflight)))
    out = {}
    mesh = LocalMesh(spec)
    mesh.start(timeout_s=600)
    try:
        for batch in batches:
            address = (f"127.0.0.1:{mesh.http_port}" if door == "http"
                       else mesh.gateway_address)
            out[batch] = served_stats(address, prompts_for(batch, vocab, seed=2), STEPS,
                                      door=door)
            print(f"  served over {door}, {api_servers} gateway(s), {inflight or 'default'} "
                  f"plans in flight, batch {batch}: ITL {out[batch][0]:.3f} ms, TPOT "
                  f"{out[batch][1]:.3f} ms, {out[batch][2]:.0f} tokens/s", flush=True)
        if py_spy:
            profile_mesh(mesh, py_spy, prompts_for(max(batches), vocab, seed=3))
    finally:
        mesh.stop()
    return out


def profile_mesh(mesh, py_spy: str, prompts, num_tokens: int = 1024) -> None:
    """Samples every mesh process with py-spy (collapsed stacks, one file each under
    $OUT or the working directory) while the batch streams num_tokens each: the thread that
    holds the GIL only (--gil), so a process's samples are its Python work, not its waits."""
    import os
    import signal

    out_dir = Path(os.environ.get("OUT", "."))
    recorders = [subprocess.Popen([py_spy, "record", "--gil", "--nonblocking", "-r", "400",
                                   "-f", "raw", "-o", str(out_dir / f"py-spy-{child.name}.txt"),
                                   "-p", str(child.proc.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for child in mesh.children]
    time.sleep(1.0)
    itl, tpot, rate = served_stats(mesh.gateway_address, prompts, num_tokens)
    for r in recorders:
        r.send_signal(signal.SIGINT)
    for r in recorders:
        r.wait(timeout=60)
    print(f"  profiled served batch {len(prompts)} x {num_tokens} tokens: ITL {itl:.3f} ms, "
          f"TPOT {tpot:.3f} ms, {rate:.0f} tokens/s; py-spy stacks in {out_dir}", flush=True)


# -- report -----------------------------------------------------------------------------------------

def report(shape, model_dir, batches, bw, hf, runner, served) -> str:
    def cell(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    def ratio(x, y):
        return f"{x / y:.2f}x" if x and y else "-"

    head = (["batch", "roofline ms", "transformers compiled ms"] + [f"{m} ms" for m in MODES]
            + ["served ITL ms", "served TPOT ms", "served tok/s", "transformers / graphs",
               "graphs / roofline", "served ITL / graphs step"])
    lines = [f"\n### Decode, {shape} shape ({model_dir.name}, bf16, context {CONTEXT} + "
             f"{STEPS} steps)\n", f"Machine: {machine()}; copy bandwidth {bw / 1e12:.2f} TB/s\n",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b in batches:
        roof, graphs = roofline_ms(model_dir, b, bw), runner.get(("CUDA graphs, triton", b))
        itl, tpot, rate = served.get(b, (None, None, None))
        row = ([str(b), cell(roof), cell(hf.get(b))] + [cell(runner.get((m, b))) for m in MODES]
               + [cell(itl), cell(tpot), cell(rate, ".0f"), ratio(hf.get(b), graphs), ratio(graphs, roof),
                  ratio(itl, graphs)])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def attempt(part, empty, *args):
    """Runs one part of the benchmark; a failure is printed and the others still run."""
    try:
        return part(*args)
    except Exception:  # noqa: BLE001 - the run must go on to the next part
        import traceback

        traceback.print_exc()
        return empty


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--parts", default="hf,exact,runner,served")
    p.add_argument("--modes", default=",".join(MODE_KEYS), help=f"of {', '.join(MODE_KEYS)}")
    p.add_argument("--profile", action="store_true", help="profile one mode's steps")
    p.add_argument("--profile-mode", default="graphs", help="the mode --profile profiles "
                   "(graphs-nopdl for kernel times without PDL's waits in them)")
    p.add_argument("--linear-table", default="", help="a table of product tiles "
                   "(bench/tune_linear.py --write) for the graphs-table mode")
    p.add_argument("--api-servers", default="1", help="gateway counts to serve with, e.g. 1,4 "
                   "(the table shows the last)")
    p.add_argument("--inflight", default="0", help="scheduler --max-inflight-steps values to "
                   "serve with, e.g. 2,3 (0 = its default; the table shows the last)")
    p.add_argument("--doors", default="grpc", help="the gateway's doors the served rows "
                   "stream through: grpc, http (OpenAI completions) or both (the table shows "
                   "the last)")
    p.add_argument("--py-spy", default="", help="py-spy binary: profile every mesh process "
                   "during one more served run at the largest batch")
    p.add_argument("--root", default="/tmp/meshserve-bench")
    p.add_argument("--json", default="", help="also write every figure here")
    a = p.parse_args()
    global LINEAR_TABLE
    LINEAR_TABLE = Path(a.linear_table) if a.linear_table else None
    parts = set(a.parts.split(","))
    batches = [int(b) for b in a.batches.split(",")]
    bw = copy_bandwidth()
    print(f"{machine()}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    figures = {}
    modes = [MODE_KEYS[m] for m in a.modes.split(",")]
    for shape in a.shapes.split(","):
        model_dir = checkpoint(shape, Path(a.root))
        if "exact" in parts:
            for line in attempt(exactness_with_table, [], model_dir):
                print(f"{shape}: {line}", flush=True)
        profile = MODE_KEYS[a.profile_mode] if a.profile else ""
        runner = attempt(runner_rows, {}, model_dir, batches, profile, modes) \
            if "runner" in parts else {}
        served = {}
        for count, inflight, door in itertools.product(
                [int(c) for c in a.api_servers.split(",")] if "served" in parts else [],
                [int(i) for i in a.inflight.split(",")], a.doors.split(",")):
            served = attempt(served_rows, {}, model_dir, batches, count, inflight,
                             a.py_spy, door) or served
        hf = attempt(hf_step_ms, {}, model_dir, batches) if "hf" in parts else {}
        torch.cuda.empty_cache()
        print(f"{shape}: transformers {hf}", flush=True)
        text = report(shape, model_dir, batches, bw, hf, runner, served)
        print(text, flush=True)
        figures[shape] = dict(hf=hf, runner={f"{m}|{b}": v for (m, b), v in runner.items()},
                              served=served, bandwidth=bw)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

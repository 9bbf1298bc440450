"""Stage-link throughput between two processes, side by side in one run, for activations
[num_tokens, hidden] in float32 and bfloat16:

    StageLink          header + tensor, a fresh tensor allocated per receive (as a stage
                       needs; glibc maps allocations of 32 MiB and more afresh each time, and
                       page faults then cost about 7 ms per 32 MiB on this machine)
    StageLink (EH)     the same with UCX endpoint error handling on
    raw ucxx           the same bytes as one UCX tag message, into a buffer allocated once
                       (same endpoint type: from the worker address, error handling off;
                       same progress engine)
    gRPC               the same bytes over a grpc.aio bidi stream (raw bytes, no proto; the
                       sender needs one `tobytes()` copy per message, the receiver none)

Each figure: the sender sends N activations back to back (each send awaited), the receiver
acknowledges after the N-th; the median of --rounds interleaved rounds.

    python bench/bench_stagelink.py [--hidden 4096] [--tokens 1 16 256 2048] [--rounds 3]

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from services.stagelink import ActivationHeader, StageLink  # noqa: E402
from services.stagelink.engine import SPIN_S, get_engine  # noqa: E402

TRANSPORTS = ("stagelink", "stagelink_eh", "raw", "grpc")
DTYPES = (torch.float32, torch.bfloat16)
RAW_TAG, ACK_TAG = 0x5EED_0001, 0x5EED_0002  # StageLink tags are random: no collision
WARMUP = 5
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20)]
STREAM_METHOD = "/bench.Sink/Stream"


def make_plan(args) -> list[tuple[int, int, torch.dtype, str, int]]:
    """(round, num_tokens, dtype, transport, count), the same in both processes."""
    plan = []
    for rnd in range(args.rounds):
        for num_tokens in args.tokens:
            for dtype in DTYPES:
                nbytes = num_tokens * args.hidden * dtype.itemsize
                count = max(10, min(1000, (args.budget_mib << 20) // nbytes))
                plan += [(rnd, num_tokens, dtype, t, count) for t in TRANSPORTS]
    return plan


# -- receiver (child process) ---------------------------------------------------------------


async def grpc_sink(request_iterator, context):
    """Per batch: an 8-byte count, then that many activations, then one ack back."""
    remaining = None
    async for message in request_iterator:
        if remaining is None:
            remaining = int.from_bytes(message, "little")
            continue
        torch.frombuffer(message, dtype=torch.uint8)  # the tensor a receiving stage would use
        remaining -= 1
        if remaining == 0:
            remaining = None
            yield b"ack"


async def receiver(conn, args) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    links = {"stagelink": StageLink("cpu"), "stagelink_eh": StageLink("cpu")}
    addresses = {name: await link.start() for name, link in links.items()}
    engine = get_engine()
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Sink", {"Stream": grpc.stream_stream_rpc_method_handler(grpc_sink)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send((addresses, engine.address, port))
    ack_ep = engine.endpoint(conn.recv(), error_handling=False)
    ack = engine.Array(np.zeros(1, np.uint64))
    raw_tag, ack_tag = engine.tag(RAW_TAG), engine.tag(ACK_TAG)
    for _, num_tokens, dtype, transport, count in make_plan(args):
        if transport == "grpc":
            continue  # served by grpc_sink on this same event loop
        raw = engine.Array(np.empty(num_tokens * args.hidden * dtype.itemsize, np.uint8))
        for n in (WARMUP, count):
            for _ in range(n):
                if transport == "raw":
                    await engine.wait(engine.worker.tag_recv(raw, raw_tag))
                else:
                    await links[transport].recv()
            await engine.wait(ack_ep.tag_send(ack, ack_tag))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the sender is done
    await server.stop(None)
    ack_ep.close_blocking(period=10**9, max_attempts=1)


def receiver_main(conn, args) -> None:
    asyncio.run(receiver(conn, args))


# -- sender (this process) -----------------------------------------------------------------


class Sender:
    def __init__(self, engine, links, raw_ep, channel):
        self.engine, self.links, self.raw_ep = engine, links, raw_ep
        self.stream = channel.stream_stream(STREAM_METHOD)
        self.ack = engine.Array(np.zeros(1, np.uint64))
        self.raw_tag, self.ack_tag = engine.tag(RAW_TAG), engine.tag(ACK_TAG)

    async def measure(self, transport: str, tensor: torch.Tensor, count: int) -> float:
        """Seconds for `count` activations, after WARMUP ones, ack included."""
        if transport == "grpc":
            return await self._grpc(tensor, count)
        await self._ucx_batch(transport, tensor, WARMUP)
        start = time.perf_counter()
        await self._ucx_batch(transport, tensor, count)
        return time.perf_counter() - start

    async def _ucx_batch(self, transport: str, tensor: torch.Tensor, n: int) -> None:
        if transport == "raw":
            view = self.engine.Array(tensor.reshape(-1).view(torch.uint8).numpy())
            for _ in range(n):
                await self.engine.wait(self.raw_ep.tag_send(view, self.raw_tag))
        else:
            link = self.links[transport]
            for step in range(n):
                await link.send(ActivationHeader.for_tensor(step, 0, tensor), tensor)
        await self.engine.wait(self.engine.worker.tag_recv(self.ack, self.ack_tag))

    async def _grpc(self, tensor: torch.Tensor, count: int) -> float:
        call = self.stream()
        await self._grpc_batch(call, tensor, WARMUP)
        start = time.perf_counter()
        await self._grpc_batch(call, tensor, count)
        elapsed = time.perf_counter() - start
        await call.done_writing()
        return elapsed

    @staticmethod
    async def _grpc_batch(call, tensor: torch.Tensor, n: int) -> None:
        await call.write(n.to_bytes(8, "little"))
        for _ in range(n):
            await call.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        assert await call.read() == b"ack"


async def sender(args) -> tuple[dict, set[str]]:
    torch.set_num_threads(1)
    links = {"stagelink": StageLink("cpu"), "stagelink_eh": StageLink("cpu", error_handling=True)}
    for link in links.values():
        await link.start()
    engine = get_engine()
    conn, child_conn = mp.Pipe()
    child = mp.get_context("spawn").Process(target=receiver_main, args=(child_conn, args))
    child.start()
    loop = asyncio.get_running_loop()
    addresses, worker_address, port = await loop.run_in_executor(None, conn.recv)
    conn.send(engine.address)
    for name, link in links.items():
        await link.connect(addresses[name])
    raw_ep = engine.endpoint(worker_address, error_handling=False)
    results: dict[tuple[int, torch.dtype, str], list[float]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        s = Sender(engine, links, raw_ep, channel)
        for _, num_tokens, dtype, transport, count in make_plan(args):
            tensor = torch.randn(num_tokens, args.hidden).to(dtype)
            seconds = await s.measure(transport, tensor, count)
            results.setdefault((num_tokens, dtype, transport), []).append(
                count * tensor.nbytes / seconds)
    conn.send("done")
    child.join(60)
    for link in links.values():
        await link.close()
    raw_ep.close_blocking(period=10**9, max_attempts=1)
    return {key: statistics.median(v) for key, v in results.items()}, engine.transports()


# -- report --------------------------------------------------------------------------------


def report(args, bps: dict, transports: set[str]) -> None:
    rows = []
    for num_tokens in args.tokens:
        for dtype in DTYPES:
            name = f"[{num_tokens}, {args.hidden}] {str(dtype).removeprefix('torch.')}"
            nbytes = num_tokens * args.hidden * dtype.itemsize
            rows.append((name, nbytes, {t: bps[(num_tokens, dtype, t)] for t in TRANSPORTS}))
    for name, nbytes, b in rows:
        print(f"{name:>22} {_size(nbytes):>7}: StageLink {b['stagelink'] / 1e9:6.2f} GB/s "
              f"({b['stagelink'] / nbytes:6.0f}/s) | raw ucxx {b['raw'] / 1e9:6.2f} | "
              f"gRPC {b['grpc'] / 1e9:5.2f} | StageLink/raw {b['stagelink'] / b['raw']:4.2f} | "
              f"StageLink/gRPC {b['stagelink'] / b['grpc']:5.2f} | "
              f"EH on/off {b['stagelink_eh'] / b['stagelink']:4.2f}")
    print()
    print_markdown(args, rows, transports)


def print_markdown(args, rows, transports: set[str]) -> None:
    import ucxx

    print("## Stage link: StageLink vs raw ucxx vs gRPC (bench/bench_stagelink.py)\n")
    print(f"Machine: {machine()}; ucxx {ucxx.__version__} (UCX {ucxx.__ucx_version__}); UCX "
          f"transports {', '.join(sorted(transports))}; StageLink's engine spins "
          f"{SPIN_S * 1e6:.0f} µs, then sleeps on UCX's epoll fd.\n")
    print(f"Two processes on one host; throughput of back-to-back activations, median of "
          f"{args.rounds} interleaved rounds. StageLink allocates a fresh tensor per receive, "
          f"raw ucxx reuses one buffer, gRPC copies once (`tobytes`) per send. Ratios above 1: "
          f"StageLink is faster.\n")
    print("| activation | bytes | StageLink GB/s | activations/s | raw ucxx GB/s | gRPC GB/s "
          "| StageLink / raw ucxx | StageLink / gRPC | error handling on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, nbytes, b in rows:
        print(f"| {name} | {_size(nbytes)} | {b['stagelink'] / 1e9:.2f} | "
              f"{b['stagelink'] / nbytes:.0f} | {b['raw'] / 1e9:.2f} | {b['grpc'] / 1e9:.2f} | "
              f"{b['stagelink'] / b['raw']:.2f} | {b['stagelink'] / b['grpc']:.2f} | "
              f"{b['stagelink_eh'] / b['stagelink']:.2f} |")


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-mib", type=int, default=64,
                   help="bytes per measurement (10 to 1000 activations)")
    args = p.parse_args()
    report(args, *asyncio.run(sender(args)))


if __name__ == "__main__":
    main()

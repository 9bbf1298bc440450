"""StageLink: the persistent UCX connection that carries activations from PP stage k to k+1.

    stage k, rank r                               stage k+1, rank r
    StageLink.connect(addr) ── endpoint ──►  StageLink.start() -> addr (published once)
    send(header, tensor)     tag messages    recv() -> (header, tensor on its own device)

One process may hold a link that receives (from stage k-1) and send on it too (to stage k+1).
Every method must be awaited on the one event loop of the process that runs its links.

Choices, with figures measured here (2 shared cores, two processes, 4 MiB messages):
- endpoints are made from UCX worker addresses, never from a listener: on one host only these
  use shared memory (sysv/posix/cma); listener-made endpoints stay on TCP.
- progress: our own engine (engine.py): spin 50 µs, then sleep on UCX's epoll fd. It moves
  2x the small messages of ucxx's asyncio "blocking"/"polling" modes and 30x its "thread" mode,
  and unlike all of them it leaves an idle core idle.
- small host tensors (<= 64 KiB) travel inside the header message (wire.py): one message, not
  two, for decode-sized activations.
- endpoint error handling off by default: with it on, UCX drops every transport that cannot report
  a peer failure, which on one host means all the shared-memory ones, leaving TCP: 0.14-0.26x
  the throughput for 128 KiB-16 MiB activations (bench/bench_stagelink.py). The cost: a send to
  a peer that died stalls instead of raising, so a dead stage is found by the scheduler (step
  timeout, heartbeats). Across nodes RDMA transports report peer failures; there
  `error_handling=True` should cost little (not measured here).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from services.stagelink.engine import UcxEngine, get_engine
from services.stagelink.errors import StageLinkError
from services.stagelink.wire import (
    HEADER_TAG,
    MAX_HEADER_MESSAGE_BYTES,
    MAX_INLINE_BYTES,
    PAYLOAD_TAG,
    TAG_KIND_BITS,
    ActivationHeader,
    pack_address,
    pack_header,
    unpack_address,
    unpack_header,
)


@dataclass
class _Incoming:
    """A received header whose payload is still to come."""

    header: ActivationHeader
    out: torch.Tensor
    request: object | None = None  # the posted payload receive


class StageLink:
    """Receives activations from the previous stage and sends them to the next one.

    Invariants: one sender per receiving link (rank r of stage k sends only to rank r of stage
    k+1); `send()` calls reach the peer in the order they are made, and `recv()` returns them in
    that order. Both may be cancelled (e.g. by `asyncio.wait_for`): a send already posted still
    completes, and a receive already posted stays posted for the next `recv()`.
    """

    def __init__(self, device: torch.device | str = "cpu", *, error_handling: bool = False):
        self.device = torch.device(device)
        self.error_handling = error_handling
        self._engine: UcxEngine | None = None
        self._address = b""
        self._recv_tags = None  # (header, payload) UCX tags of this link
        self._send_tags = None  # (header, payload) UCX tags of the next stage's link
        self._ep = None  # endpoint to the next stage
        self._header_buf = np.empty(MAX_HEADER_MESSAGE_BYTES, np.uint8)
        self._header_array = None  # UCX's view of _header_buf
        self._header_request = None  # a posted header receive that a cancelled recv() left
        self._incoming: _Incoming | None = None
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._closed = False

    @property
    def address(self) -> bytes:
        return self._address

    async def start(self) -> bytes:
        """Starts UCX here (once per process) and returns this link's address to publish."""
        if self._address:
            return self._address
        engine = get_engine()
        if self.device.type == "cuda":
            _check_cuda_transports(engine)
            # UCX's CUDA transports use the context current on the thread that progresses them:
            # this one (the event loop's). One GPU per worker process, so make it this device's.
            torch.cuda.set_device(self.device)
            torch.cuda.current_stream(self.device).synchronize()
        tag = secrets.randbits(64) & ~((1 << TAG_KIND_BITS) - 1)
        self._recv_tags = (engine.tag(tag | HEADER_TAG), engine.tag(tag | PAYLOAD_TAG))
        self._header_array = engine.Array(self._header_buf)
        self._address = pack_address(tag, engine.address)
        self._engine = engine
        return self._address

    async def connect(self, peer_address: bytes) -> None:
        """Makes the persistent endpoint to the next stage's link (its `start()` result),
        replacing the one made before, if any."""
        engine = self._require_started()
        peer_tag, worker_address = unpack_address(peer_address)
        if self._ep is not None:  # a restarted scheduler joins the stages again
            self._close_endpoint()
        try:
            self._ep = engine.endpoint(worker_address, self.error_handling)
        except engine.api.UCXError as e:
            raise StageLinkError(
                f"cannot reach the next stage at its published address ({e}): is that worker "
                f"still running, and is its host reachable with the UCX transports here "
                f"({', '.join(sorted(engine.transports()))})?") from e
        self._send_tags = (engine.tag(peer_tag | HEADER_TAG), engine.tag(peer_tag | PAYLOAD_TAG))

    async def send(self, header: ActivationHeader, tensor: torch.Tensor) -> None:
        """Sends `tensor` (any device; a CUDA tensor goes as it is, without a host copy)."""
        engine = self._require_started()
        if self._ep is None:
            raise StageLinkError("connect() this stage link to the next stage before send()")
        if tuple(tensor.shape) != header.shape or str(tensor.dtype) != f"torch.{header.dtype}":
            raise ValueError(f"header says {header.dtype}{list(header.shape)}, tensor is "
                             f"{tensor.dtype}{list(tensor.shape)}")
        tensor = tensor.contiguous()
        async with self._send_lock:  # posts in call order, even across a wait for CUDA work
            if tensor.is_cuda and header.nbytes:
                await _current_stream_done(tensor.device)
            if header.nbytes == 0:
                messages = [pack_header(header)]
            elif tensor.device.type == "cpu" and header.nbytes <= MAX_INLINE_BYTES:
                messages = [pack_header(header, _wire_view(tensor))]
            else:
                messages = [pack_header(header), _wire_view(tensor)]
            buffers = [engine.Array(m) for m in messages]
            what = (f"sending step {header.step_id} micro-batch {header.micro_batch} to the "
                    f"next stage")
            try:
                requests = [self._ep.tag_send(b, t) for b, t in zip(buffers, self._send_tags)]
            except engine.api.UCXError as e:
                raise StageLinkError(f"{what} failed: {e}") from e
        try:
            for request in requests:
                await self._wait(request, what)
        except asyncio.CancelledError:
            engine.keep_until_done(requests, buffers)
            raise

    async def recv(self) -> tuple[ActivationHeader, torch.Tensor]:
        """Receives the next activation from the previous stage, into a new tensor on `device`."""
        engine = self._require_started()
        async with self._recv_lock:
            if self._incoming is None:
                if self._header_request is None:
                    self._header_request = engine.worker.tag_recv(self._header_array,
                                                                  self._recv_tags[0])
                await self._wait(self._header_request, "receiving from the previous stage")
                self._header_request = None
                header, inline_at = unpack_header(self._header_buf)
                out = torch.empty(header.shape, dtype=getattr(torch, header.dtype),
                                  device=self.device)
                if inline_at is not None:
                    payload = self._header_buf[inline_at:inline_at + header.nbytes]
                    out.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(payload))
                    return header, out
                self._incoming = _Incoming(header, out)
            incoming = self._incoming
            if incoming.request is None and incoming.header.nbytes:
                if incoming.out.is_cuda:  # `out` may reuse memory that queued kernels still read
                    await _current_stream_done(incoming.out.device)
                incoming.request = engine.worker.tag_recv(
                    engine.Array(_wire_view(incoming.out)), self._recv_tags[1])
            if incoming.request is not None:
                await self._wait(incoming.request, "receiving from the previous stage")
            self._incoming = None
            return incoming.header, incoming.out

    async def close(self) -> None:
        """Closes the endpoint to the next stage; UCX itself stays up for the process. A recv()
        waiting in another task is not woken: cancel that task."""
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:  # receives still posted keep their buffers until matched
            pending = self._incoming.request if self._incoming else None
            self._engine.keep_until_done([self._header_request, pending],
                                         self._header_buf, self._incoming)
        self._close_endpoint()

    def _close_endpoint(self) -> None:
        if self._ep is not None:
            ep, self._ep = self._ep, None
            with contextlib.suppress(self._engine.api.UCXError):  # a dead peer: nothing to flush
                ep.close_blocking(period=10**9, max_attempts=1)  # waits at most 1 s
                ep.remove_close_callback()

    # -- internals ------------------------------------------------------------------------

    def _require_started(self) -> UcxEngine:
        if self._closed:
            raise StageLinkError("this stage link is closed")
        if self._engine is None:
            raise StageLinkError("await StageLink.start() first")
        return self._engine

    async def _wait(self, request, what: str) -> None:
        try:
            await self._engine.wait(request)
        except self._engine.api.UCXError as e:
            raise StageLinkError(f"{what} failed: {e}") from e


def _wire_view(tensor: torch.Tensor):
    """The tensor's bytes without a copy: [nbytes] uint8, a numpy view on CPU, the CUDA tensor
    itself (UCX reads `__cuda_array_interface__`) on GPU. `tensor` must be contiguous."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


async def _current_stream_done(device: torch.device) -> None:
    """UCX copies outside CUDA streams: wait, off the event loop, for the work queued so far on
    this thread's current stream of `device` (the stream that made or last used the tensor)."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    if not event.query():
        await asyncio.to_thread(event.synchronize)


def _check_cuda_transports(engine: UcxEngine) -> None:
    transports = engine.transports()
    if not any(t.startswith("cuda") for t in transports):
        raise StageLinkError(
            f"this stage link lives on a CUDA device but UCX has no CUDA transport (active: "
            f"{', '.join(sorted(transports))}): install the ucxx/libucx build for your CUDA "
            f"(`pip install ucxx-cu12`), and keep UCX_TLS (if set) including cuda_copy,cuda_ipc")

"""StageLink: the persistent UCX connection that carries activations from PP stage k to k+1.

    stage k, rank r                               stage k+1, rank r
    StageLink.connect(addr) ── endpoint ──►  StageLink.start() -> addr (published once)
    send(header, tensor)     tag messages    recv() -> (header, tensor on its own device)

One process may hold a link that receives (from stage k-1) and send on it too (to stage k+1).
Every method must be awaited on the event loop that awaited `start()`: UCX is progressed there.

Choices, with figures measured here (2 shared cores, two processes, worker-address endpoints,
`ucxx` send/recv loop, 16 KiB / 4 MiB messages):
- endpoints are made from UCX worker addresses, never from a listener: on one host only they use
  shared memory (sysv/posix/cma); listener-made endpoints stay on TCP.
- progress mode "blocking": 92k msg/s / 20.6 GB/s; "polling" 97k msg/s / 20.2 GB/s (the same
  within noise) but spins a core even when idle, which a worker on a small machine cannot spare
  (its model thread needs it); ucxx's default "thread" mode: 6k msg/s / 7.2 GB/s.
- endpoint error handling off by default: with it on, UCX drops every transport that cannot report
  a peer failure, which on one host means all the shared-memory ones: 4 MiB messages fell from
  4.1–5.8 GB/s to 0.35–0.41 GB/s (TCP). The cost: a send to a peer that died stalls instead of
  raising, so a dead stage is found by the scheduler's step timeout / heartbeats. Across nodes
  RDMA transports report peer failures; there `error_handling=True` should cost little.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import torch

from services.stagelink.errors import StageLinkError
from services.stagelink.wire import (
    HEADER_TAG,
    MAX_HEADER_MESSAGE_BYTES,
    PAYLOAD_TAG,
    TAG_KIND_BITS,
    ActivationHeader,
    pack_address,
    pack_header,
    unpack_address,
    unpack_header,
)

PROGRESS_MODE = "blocking"

_ucxx = None  # the `ucxx` module once UCX has started in this process


def start_ucx():
    """Imports and initialises `ucxx` once per process; every link of the process shares it."""
    global _ucxx
    if _ucxx is not None:
        return _ucxx
    # ucxx sets UCX_MEMTYPE_CACHE, which the UCX it ships no longer reads: silence that warning.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx
    except Exception as e:  # ImportError, or OSError when libucx cannot be loaded
        raise StageLinkError(
            f"pipeline parallelism needs UCX through the `ucxx` package, which failed to import "
            f"({type(e).__name__}: {e}). Install it with `pip install ucxx-cu12` (it brings "
            f"libucx; ucxx-cu13 on CUDA 13), or run with --pp 1") from e
    try:
        ucxx.init(progress_mode=PROGRESS_MODE)
    except RuntimeError as e:
        if "already initiated" not in str(e):  # started by other code in this process: share it
            raise StageLinkError(f"UCX failed to start: {e}") from e
    except Exception as e:
        raise StageLinkError(
            f"UCX failed to start ({type(e).__name__}: {e}). Check the UCX_* environment "
            f"variables (UCX_TLS, UCX_NET_DEVICES) and that `ucx_info -d` lists transports") from e
    _ucxx = ucxx
    return ucxx


class StageLink:
    """Receives activations from the previous stage and sends them to the next one.

    Invariants: one sender per receiving link (rank r of stage k sends only to rank r of stage
    k+1); `send()` calls reach the peer in the order they are made, and `recv()` returns them in
    that order. Both are safe to cancel (e.g. under `asyncio.wait_for`): a transfer already
    begun completes in the background and `recv()` hands its result to the next caller.
    """

    def __init__(self, device: torch.device | str = "cpu", *, error_handling: bool = False):
        self.device = torch.device(device)
        self.error_handling = error_handling
        self._ucxx = None
        self._address = b""
        self._tag = 0  # this link's receive tag base: low TAG_KIND_BITS are the message kind
        self._ep = None  # endpoint to the next stage
        self._peer_tag = 0
        self._header_buf = bytearray(MAX_HEADER_MESSAGE_BYTES)
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._receiving: asyncio.Future | None = None  # a receive that outlived a cancelled recv()
        self._closed = False

    @property
    def address(self) -> bytes:
        return self._address

    async def start(self) -> bytes:
        """Starts UCX here (once per process) and returns this link's address to publish."""
        if self._address:
            return self._address
        ucxx = start_ucx()
        ucxx.continuous_ucx_progress(event_loop=asyncio.get_running_loop())
        if self.device.type == "cuda":
            _check_cuda_transports(ucxx)
        self._ucxx = ucxx
        self._tag = secrets.randbits(64) & ~((1 << TAG_KIND_BITS) - 1)
        self._address = pack_address(self._tag, bytes(ucxx.get_worker_address()))
        return self._address

    async def connect(self, peer_address: bytes) -> None:
        """Makes the persistent endpoint to the next stage's link (its `start()` result)."""
        ucxx = self._require_started()
        if self._ep is not None:
            raise StageLinkError("this stage link is already connected to a next stage")
        peer_tag, worker_address = unpack_address(peer_address)
        try:
            self._ep = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(worker_address),
                endpoint_error_handling=self.error_handling)
        except ucxx.exceptions.UCXError as e:
            raise StageLinkError(
                f"cannot reach the next stage at its published address ({e}): is that worker "
                f"still running, and is its host reachable with the UCX transports here "
                f"({', '.join(sorted(ucxx.get_active_transports()))})?") from e
        self._peer_tag = peer_tag

    async def send(self, header: ActivationHeader, tensor: torch.Tensor) -> None:
        """Sends `tensor` (any device; a CUDA tensor goes as it is, without a host copy)."""
        self._require_started()
        if self._ep is None:
            raise StageLinkError("connect() this stage link to the next stage before send()")
        if tuple(tensor.shape) != header.shape or str(tensor.dtype) != f"torch.{header.dtype}":
            raise ValueError(f"header says {header.dtype}{list(header.shape)}, tensor is "
                             f"{tensor.dtype}{list(tensor.shape)}")
        # Shielded: once begun, header and payload both go, even if the caller is cancelled.
        await asyncio.shield(asyncio.ensure_future(self._send(header, tensor.contiguous())))

    async def recv(self) -> tuple[ActivationHeader, torch.Tensor]:
        """Receives the next activation from the previous stage, into a new tensor on `device`."""
        self._require_started()
        async with self._recv_lock:
            if self._receiving is None:
                self._receiving = asyncio.ensure_future(self._receive())
            try:
                result = await asyncio.shield(self._receiving)
            except asyncio.CancelledError:
                raise  # the receive goes on; the next recv() returns its result
            except BaseException:
                self._receiving = None
                raise
            self._receiving = None
            return result

    async def close(self) -> None:
        """Closes the endpoint to the next stage. UCX itself stays up for the process."""
        self._closed = True
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None
        if self._ep is not None:
            ep, self._ep = self._ep, None
            await ep.close()

    # -- internals ------------------------------------------------------------------------

    def _require_started(self):
        if self._closed:
            raise StageLinkError("this stage link is closed")
        if self._ucxx is None:
            raise StageLinkError("await StageLink.start() first")
        return self._ucxx

    async def _send(self, header: ActivationHeader, tensor: torch.Tensor) -> None:
        ep, ucx_error = self._ep, self._ucxx.exceptions.UCXError
        async with self._send_lock:  # keeps each header next to its payload on the wire
            if tensor.is_cuda:
                await _current_stream_done(tensor.device)
            sends = [ep.send(pack_header(header), tag=self._peer_tag | HEADER_TAG, force_tag=True)]
            if header.nbytes:
                sends.append(ep.send(_wire_view(tensor), tag=self._peer_tag | PAYLOAD_TAG,
                                     force_tag=True))
            try:
                await asyncio.gather(*sends)  # both submitted before either is waited on
            except ucx_error as e:
                raise StageLinkError(f"sending step {header.step_id} micro-batch "
                                     f"{header.micro_batch} to the next stage failed: {e}") from e

    async def _receive(self) -> tuple[ActivationHeader, torch.Tensor]:
        ucxx = self._ucxx
        try:
            await ucxx.recv(self._header_buf, tag=self._tag | HEADER_TAG)
            header = unpack_header(memoryview(self._header_buf))
            out = torch.empty(header.shape, dtype=getattr(torch, header.dtype),
                              device=self.device)
            if header.nbytes:
                if out.is_cuda:  # `out` may reuse memory that queued kernels still read
                    await _current_stream_done(out.device)
                await ucxx.recv(_wire_view(out), tag=self._tag | PAYLOAD_TAG)
        except ucxx.exceptions.UCXError as e:
            raise StageLinkError(f"receiving from the previous stage failed: {e}") from e
        return header, out


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


def _check_cuda_transports(ucxx) -> None:
    transports = ucxx.get_active_transports()
    if not any(t.startswith("cuda") for t in transports):
        raise StageLinkError(
            f"this stage link lives on a CUDA device but UCX has no CUDA transport (active: "
            f"{', '.join(sorted(transports))}): install the ucxx/libucx build for your CUDA "
            f"(`pip install ucxx-cu12`), and keep UCX_TLS (if set) including cuda_copy,cuda_ipc")

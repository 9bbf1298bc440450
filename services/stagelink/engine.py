"""One UCX worker per process, progressed from its asyncio event loop: spin briefly, then sleep.

Built on ucxx's core (Cython) API, `ucxx._lib.libucxx`, not on its asyncio layer, because that
layer's request wait is `while not done: await asyncio.sleep(0)` in every progress mode, and its
"blocking" mode never re-arms the worker after the first event: a process that has received
anything once then spins a whole core for good, idle or not (measured here: 2.0 CPU-seconds per
2 idle seconds, in "blocking" and "polling" alike). A worker's model thread needs that core.

UCX's wake-up protocol, as driven here:

    wait(request) ── done? ─────────────────────────────────────────────► return
         │ no
         ├─ spin: worker.progress() for up to SPIN_S ── done? ───────────► return
         │ no
         └─ park a future; drive(): progress, complete parked futures, arm
                              ▲                                   │ armed
                              └── loop reader on the worker's ◄───┘
                                  epoll fd (any UCX event)

Figures, two processes, shared memory, 16 KiB / 4 MiB messages back to back:
    this engine, SPIN_S = 50 µs   190–200k msg/s, 17–29 GB/s, 0.0 CPU-s per idle second
    this engine, no spin           15k msg/s, 15–16 GB/s, 0.0
    ucxx asyncio, "blocking"       81–92k msg/s, 20–21 GB/s, 1.0 (spins once used)
    ucxx asyncio, "polling"        97k msg/s, 20 GB/s, 1.0
    ucxx asyncio, "thread"         6k msg/s, 7–8 GB/s (thread + Python futures: 6k, 12 GB/s)
"""

from __future__ import annotations

import asyncio
import os
import re
import time

from services.stagelink.errors import StageLinkError

# Long enough to catch a reply over shared memory or RDMA without a trip through epoll (10 µs
# already gave the full 192k msg/s above); short enough that a stage waiting for its next
# activation sleeps almost at once.
SPIN_S = 50e-6
# A parked request is re-checked this often even without a UCX event (no wake-up can be lost).
WATCHDOG_S = 0.1

_engine: UcxEngine | None = None


def get_engine() -> UcxEngine:
    """The process's engine, started on first use on the running event loop."""
    global _engine
    loop = asyncio.get_running_loop()
    if _engine is not None and _engine.loop is loop:
        return _engine
    if _engine is not None and not _engine.loop.is_closed():
        raise StageLinkError("stage links of one process must all live on one event loop")
    _engine = UcxEngine(loop, _import_ucx())
    return _engine


def _import_ucx():
    # ucxx sets UCX_MEMTYPE_CACHE, which the UCX it ships no longer reads: silence that warning.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx._lib.libucxx as ucx_api  # importing ucxx sets its UCX defaults, loads libucx
    except Exception as e:  # ImportError, or OSError when libucx cannot be loaded
        raise StageLinkError(
            f"pipeline parallelism needs UCX through the `ucxx` package, which failed to import "
            f"({type(e).__name__}: {e}). Install it with `pip install ucxx-cu12` (it brings "
            f"libucx; ucxx-cu13 on CUDA 13), or run with --pp 1") from e
    return ucx_api


class UcxEngine:
    def __init__(self, loop: asyncio.AbstractEventLoop, ucx_api):
        from ucxx._lib.arr import Array

        self.loop = loop
        self.api = ucx_api
        self.Array = Array
        try:
            self.context = ucx_api.UCXContext(
                feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
            self.worker = ucx_api.UCXWorker(self.context)
            self.worker.init_blocking_progress_mode()
        except Exception as e:
            raise StageLinkError(
                f"UCX failed to start ({type(e).__name__}: {e}). Check the UCX_* environment "
                f"variables (UCX_TLS, UCX_NET_DEVICES) and that `ucx_info -d` lists "
                f"transports") from e
        self.address = bytes(self.worker.address)
        self._parked: list[tuple[object, asyncio.Future]] = []  # (request, its waiter)
        self._watchdog: asyncio.TimerHandle | None = None
        # Requests nobody waits for any more (cancelled, or their link closed), with the buffers
        # UCX still reads or writes: kept alive until the requests complete.
        self._orphans: list[tuple[list, tuple]] = []
        loop.add_reader(self.worker.epoll_file_descriptor, self.drive)

    def transports(self) -> set[str]:
        """Transports UCX may use here, e.g. {"cma", "posix", "tcp", "cuda_copy", "rc_mlx5"}."""
        lines = re.findall("^#.*resource.*md.*dev.*flags.*$", self.context.info, re.MULTILINE)
        return {line.split()[-1].split("/")[0] for line in lines}

    def tag(self, value: int):
        return self.api.UCXXTag(value)

    def endpoint(self, worker_address: bytes, error_handling: bool):
        address = self.api.UCXAddress.create_from_buffer(worker_address)
        ep = self.api.UCXEndpoint.create_from_worker_address(self.worker, address, error_handling)
        self.drive()
        return ep

    async def wait(self, request) -> None:
        """Until `request` completes; raises its UCX error. Cancelling leaves it posted."""
        if not request.completed:
            deadline = time.perf_counter() + SPIN_S
            while not request.completed and time.perf_counter() < deadline:
                self.worker.progress()
        if not request.completed:
            waiter = self.loop.create_future()
            self._parked.append((request, waiter))
            self.drive()
            if self._watchdog is None:
                self._watchdog = self.loop.call_later(WATCHDOG_S, self._check_parked)
            await waiter
        elif self._parked:
            self.drive()  # the spin may have completed parked requests, and it disarmed UCX
        request.check_error()

    def keep_until_done(self, requests: list, *buffers) -> None:
        """Keeps `buffers` alive until every request in `requests` has completed."""
        self._orphans.append(([r for r in requests if r is not None], buffers))

    def drive(self) -> None:
        """Progresses until UCX is quiet, completes parked waiters, arms the epoll fd."""
        while True:
            self.worker.progress()
            if self._parked:
                self._parked = [(r, w) for r, w in self._parked if not _settled(r, w)]
            if self._orphans:
                self._orphans = [o for o in self._orphans if not all(r.completed for r in o[0])]
            if self.worker.arm():
                return

    def _check_parked(self) -> None:
        self._watchdog = None
        self.drive()
        if self._parked:
            self._watchdog = self.loop.call_later(WATCHDOG_S, self._check_parked)


def _settled(request, waiter: asyncio.Future) -> bool:
    if waiter.done():  # cancelled by its caller
        return True
    if request.completed:
        waiter.set_result(None)
        return True
    return False

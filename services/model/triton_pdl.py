"""Programmatic dependent launch (PDL) of the Triton decode kernels, on Hopper and later GPUs.

A decode step is some hundred kernels back to back, most a few microseconds long. Without PDL
each one starts only once the grid before it has drained: its launch and the ramp of its first
programs are idle time between two kernels. Launched with PDL (`launch_pdl=True`, the CUDA
attribute programmatic stream serialization), a kernel may be scheduled while the kernel before
it still runs, and waits on the GPU, not the host, for that kernel's memory:

    every kernel launched this way begins with `pdl_begin(PDL)`:
        griddepcontrol.launch_dependents   the next kernel may launch once all of this kernel's
                                           programs have started
        griddepcontrol.wait                blocks until the kernel before has finished and its
                                           writes are visible

Since every such kernel waits before its first memory access, a kernel never reads or writes
what the kernel before it touches too early, and ordering is transitive along the stream
(decode attention reads its step inputs, sequence lengths and block tables, before the wait:
see triton_attention). Kernels launched without PDL (cuBLAS, torch's) keep the plain stream
order. CUDA graphs keep
the launches' PDL edges when captured. Off on CPUs, under the Triton interpreter (its CPU
programs run one after another anyway) and before compute capability 9.0; `MESHSERVE_PDL=0` in
the environment (or `ENABLED = False`) turns it off everywhere (bench_decode compares both).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("MESHSERVE_PDL", "1") != "0"


def enabled(device: torch.device) -> bool:
    """Whether kernels on device launch with PDL."""
    return ENABLED and device.type == "cuda" and _supported(device.index or 0)


def kwargs(device: torch.device) -> dict:
    """A kernel's PDL argument and launch option on device: `kernel[grid](..., **kwargs(d))`."""
    on = enabled(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# Whether decode attention asks L2 for its first K/V tile before its wait
# (`MESHSERVE_PDL_PREFETCH_KV=1`; bench_decode's graphs-kvprefetch mode measures it)
PREFETCH_KV = os.environ.get("MESHSERVE_PDL_PREFETCH_KV", "0") == "1"


@functools.cache
def _supported(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """First statement of a kernel launched with kwargs(device): let the next kernel launch, then
    wait for the one before (both no-ops when PDL is off)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


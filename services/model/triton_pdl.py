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
what the kernel before it touches too early, and ordering is transitive along the stream;
a product's kernel may first ask L2 for the start of its weight slice (`pdl_begin_prefetching`:
a prefetch is a hint that reads no data into the program, and weights are written by no kernel),
so the weights start streaming while the kernel before drains;
kernels launched without PDL (cuBLAS, torch's) keep the plain stream order. CUDA graphs keep
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


# K tiles of its weight slice a product's program asks L2 for before its wait; 0: no prefetch
# (`MESHSERVE_PDL_PREFETCH=0`; bench_decode compares both)
PREFETCH_TILES = 4 if os.environ.get("MESHSERVE_PDL_PREFETCH", "1") != "0" else 0
# Whether decode attention asks L2 for its first K/V tile before its wait
PREFETCH_KV = os.environ.get("MESHSERVE_PDL_PREFETCH_KV", "1") != "0"


def prefetch_cols(block_k: int, dtype: torch.dtype, split_k: int = 1) -> int:
    """Columns of its weight rows a product's program prefetches (pdl_begin_prefetching): the
    first PREFETCH_TILES K tiles it will read, contiguous only without a split of K (with one,
    a program's tiles lie SPLIT_K tiles apart: it prefetches its first); a line at least, or
    none when PREFETCH_TILES is 0."""
    if PREFETCH_TILES == 0:
        return 0
    tiles = PREFETCH_TILES if split_k == 1 else 1
    return max(tiles * block_k, 128 // dtype.itemsize)


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


@triton.jit
def pdl_begin_prefetching(PDL: tl.constexpr, w_ptr, rows, row_stride, num_cols,
                          COLS: tl.constexpr):
    """pdl_begin, first asking L2 for columns [0, COLS) of `rows` (clamped in range by the
    caller) of the row-major matrix at w_ptr, one prefetch per 128-byte line. For weights only:
    memory that no kernel writes while the model runs. COLS: 0 (no prefetch) or at least one
    line of w_ptr's dtype."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if COLS > 0:
            LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements
            cols = tl.minimum(tl.arange(0, COLS // LINE) * LINE, num_cols - 1)
            lines = w_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [lines],
                                      dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()

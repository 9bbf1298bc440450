"""Builds every Triton kernel the model launches for Hopper (sm_90) as it launches on an H200,
programmatic dependent launch on, with no GPU: Triton's compiler and the ptxas in its wheel.

    python -m tests.model.hopper_build [CASE ...]      prints one line per case, exits 1 on a failure

Each case calls the model's Python wrapper on CPU tensors with the kernel launch intercepted:
the launch's arguments give the signature and the constants, and triton.compile builds it. Run
without TRITON_INTERPRET (the interpreter replaces the kernels with Python functions);
tests/model/test_triton_compile.py runs it in a process of its own."""

from __future__ import annotations

import sys
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from services.model import triton_attention, triton_gemv, triton_linear, triton_ops, triton_pdl
from services.model.triton_linear import Tile

HOPPER = GPUTarget("cuda", 90, 32)
LAUNCH_OPTIONS = ("num_warps", "num_stages")
_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
          torch.int32: "*i32", torch.int64: "*i64"}

def launches(call) -> list[tuple[JITFunction, dict, dict, dict]]:
    """(kernel, signature, constants, options) of every launch `call()` makes."""
    seen = []

    def capture(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        kwargs.pop("launch_pdl", None)
        values = dict(zip([p.name for p in self.params], args)) | kwargs
        signature, constants = {}, {}
        for param in self.params:
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constants[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = _TYPES[value.dtype]
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
        seen.append((self, signature, constants, options))

    pdl = {"PDL": True, "launch_pdl": True}
    with mock.patch.object(JITFunction, "run", capture), \
            mock.patch.object(triton_pdl, "kwargs", lambda device: pdl):
        call()
    assert seen, "no kernel launched"
    return seen


def bf16(*shape):
    return torch.randn(*shape).bfloat16()


def _decode_attention(splits, prefetch_kv=False, rotary=False):
    cache = bf16(2, 9, 16, 8, 64)
    tables = torch.zeros(4, 4, dtype=torch.int32)

    def call():
        q = bf16(4, 48 * 64)[:, :32 * 64].view(4, 32, 64) if rotary else bf16(4, 32, 64)
        with mock.patch.object(triton_pdl, "PREFETCH_KV", prefetch_kv):
            triton_attention.paged_decode_attention(
                q, cache, tables, torch.full((4,), 40, dtype=torch.int32), 0.125, splits,
                rotary=(bf16(4, 64), bf16(4, 64), torch.arange(4)) if rotary else None)
    return call


CASES = {
    "gemv-none": lambda: triton_gemv.gemv(bf16(1, 2048), bf16(64, 2048), Tile(4, 512)),
    "gemv-add_rms_norm": lambda: triton_gemv.gemv(
        bf16(1, 2048), bf16(64, 2048), Tile(16, 256, 1, 2), "add_rms_norm", bf16(1, 2048),
        bf16(2048), 1e-5),
    "gemv-silu_mul": lambda: triton_gemv.gemv(bf16(1, 2 * 512), bf16(64, 512), Tile(4, 512),
                                              "silu_mul"),
    "skinny": lambda: triton_linear.skinny_matmul(bf16(64, 2048), bf16(256, 2048),
                                                  Tile(128, 64, 1, 4), torch.float32),
    "skinny-argmax": lambda: triton_linear.skinny_matmul_argmax(bf16(64, 2048), bf16(1000, 2048),
                                                                Tile(128, 64, 1, 4), 990),
    "skinny-split": lambda: triton_linear.skinny_matmul(bf16(16, 2048), bf16(256, 2048),
                                                        Tile(32, 128, 4)),
    "gate_up_silu": lambda: triton_linear.gate_up_silu(bf16(64, 2048), bf16(512, 2048),
                                                       Tile(32, 128, 1, 3)),
    "qkv_rope": lambda: triton_linear.qkv_rope(
        bf16(64, 2048), bf16(48 * 64, 2048), bf16(64, 64), bf16(64, 64), bf16(2, 9, 16, 8, 64),
        torch.arange(64, dtype=torch.int64), 32, 8, 64, Tile(16, 128, 1, 3)),
    "add_rms_norm": lambda: triton_ops.fused_add_rms_norm(bf16(64, 2048), bf16(64, 2048),
                                                          bf16(2048), 1e-5),
    "silu_and_mul": lambda: triton_ops.silu_and_mul(bf16(64, 2 * 512)),
    "rotary_and_cache": lambda: triton_ops.rotary_and_cache(
        bf16(4, 48 * 64), bf16(4, 64), bf16(4, 64), bf16(2, 9, 16, 8, 64),
        torch.arange(4, dtype=torch.int64), 32, 8, 64),
    "argmax": lambda: triton_ops.argmax_rows(torch.randn(4, 1000)),
    "decode-attention": _decode_attention(1),
    "decode-attention-split": _decode_attention(4),
    "decode-attention-prefetch": _decode_attention(1, prefetch_kv=True),
    "decode-attention-rotary": _decode_attention(1, rotary=True),
    "decode-attention-rotary-split": _decode_attention(4, rotary=True),
    "prefill-attention": lambda: triton_attention.paged_prefill_attention(
        bf16(8, 32, 64), bf16(2, 9, 16, 8, 64), torch.zeros(2, 4, dtype=torch.int32),
        torch.tensor([5, 3], dtype=torch.int32), torch.tensor([0, 5, 8], dtype=torch.int32), 5,
        0.125),
}


def build(case: str) -> None:
    """Compiles every launch of the case; raises on a compile error or a missing PDL prologue."""
    for kernel, signature, constants, options in launches(CASES[case]):
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        ptx = triton.compile(source, target=HOPPER, options=options).asm["ptx"]
        name = kernel.__name__
        assert "griddepcontrol.wait" in ptx, f"{name}: no PDL wait"
        if any(v for k, v in constants.items() if k.startswith("PREFETCH_")):  # asked for early
            assert "prefetch.global.L2" in ptx, f"{name}: no prefetch"
            assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait"), \
                f"{name}: the prefetch comes after the wait"


def main(cases: list[str]) -> int:
    failed = 0
    for case in cases or CASES:
        try:
            build(case)
            print(f"ok {case}", flush=True)
        except Exception as exc:  # noqa: BLE001 - every case is reported
            failed += 1
            print(f"FAILED {case}: {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

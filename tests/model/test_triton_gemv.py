"""The fused batch-1 products (compiled on a GPU, Triton's interpreter elsewhere) against the unfused
torch path they replace, the layer functions that call them, and the table keys that decide where
they run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton_gemv = pytest.importorskip("services.model.triton_gemv")
from services.model.triton_linear import Tile  # noqa: E402

EPS = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def rms_norm(h, w):
    hf = h.float()
    return w.float() * hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("tile", [Tile(16, 32), Tile(8, 64, num_warps=2), Tile(32, 128)])
def test_plain_product_equals_linear(tile):
    x, w = randn(1, 128, seed=1), randn(80, 128, seed=2)  # 80: a masked last N tile
    y, h = triton_gemv.gemv(x, w, tile)
    assert h is None
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_add_rms_norm_prologue_returns_the_stream_and_its_normed_product():
    x, res, w_n = randn(1, 256, seed=3), randn(1, 256, seed=4), randn(256, seed=5)
    w = randn(48, 256, seed=6) / 16
    y, h = triton_gemv.gemv(x, w, Tile(16, 64), "add_rms_norm", residual=res, norm_weight=w_n, eps=EPS)
    torch.testing.assert_close(h, x + res, rtol=0, atol=0)  # the residual stream, exactly
    torch.testing.assert_close(y, F.linear(rms_norm(x + res, w_n), w), rtol=1e-5, atol=1e-5)


def test_rms_norm_prologue_without_residual():
    x, w_n, w = randn(1, 128, seed=7), randn(128, seed=8), randn(40, 128, seed=9)
    y, h = triton_gemv.gemv(x, w, Tile(16, 32), "rms_norm", norm_weight=w_n, eps=EPS)
    assert h is None
    torch.testing.assert_close(y, F.linear(rms_norm(x, w_n), w), rtol=1e-5, atol=1e-5)


def test_silu_mul_prologue_reads_gate_then_up():
    gate_up, w = randn(1, 2 * 96, seed=10), randn(64, 96, seed=11)
    gate, up = gate_up.chunk(2, dim=-1)
    y, _ = triton_gemv.gemv(gate_up, w, Tile(32, 32), "silu_mul")
    torch.testing.assert_close(y, F.linear(F.silu(gate) * up, w), rtol=1e-5, atol=1e-5)


def test_bf16_fused_norm_stays_within_the_bf16_error_of_the_unfused_path():
    """bf16: the unfused path rounds the normed input before the product, the fused one does not;
    both stay within bf16 rounding of the float32 result."""
    x, res = randn(1, 512, seed=12).bfloat16(), randn(1, 512, seed=13).bfloat16()
    w_n, w = (1 + randn(512, seed=14) / 10).bfloat16(), (randn(256, 512, seed=15) / 23).bfloat16()
    y, h = triton_gemv.gemv(x, w, Tile(16, 128), "add_rms_norm", residual=res, norm_weight=w_n, eps=EPS)
    assert y.dtype == h.dtype == torch.bfloat16
    exact = F.linear(rms_norm((x.float() + res.float()).bfloat16(), w_n), w.float())
    unfused = F.linear(rms_norm(h, w_n).bfloat16(), w).float()
    err_fused, err_unfused = (y.float() - exact).abs().max(), (unfused - exact).abs().max()
    assert err_fused <= max(err_unfused * 1.5, 2**-7 * exact.abs().max())


def test_float32_output_of_bf16_inputs():
    x, w = randn(1, 64, seed=16).bfloat16(), randn(24, 64, seed=17).bfloat16()
    y, _ = triton_gemv.gemv(x, w, Tile(8, 32), out_dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-5)


def test_shapes_and_arguments_that_do_not_fit_are_refused():
    w = randn(32, 96)
    assert not triton_gemv.fits(randn(1, 96), w, "none", Tile(16, 64))  # 96 % 64
    assert not triton_gemv.fits(randn(2, 96), w, "none", Tile(16, 32))  # batch 1 only
    assert triton_gemv.fits(randn(1, 192), w, "silu_mul", Tile(16, 32))  # [gate | up]
    with pytest.raises(ValueError, match="do not fit"):
        triton_gemv.gemv(randn(1, 96), w, Tile(16, 64))
    with pytest.raises(ValueError, match="residual"):
        triton_gemv.gemv(randn(1, 96), w, Tile(16, 32), "add_rms_norm", norm_weight=randn(96))
    with pytest.raises(ValueError, match="unknown prologue"):
        triton_gemv.gemv(randn(1, 96), w, Tile(16, 32), "gelu")


def test_table_keys_name_the_prologue_and_cpu_tensors_take_the_unfused_path():
    assert triton_gemv.table_key("silu_mul", 2048, 8192, torch.bfloat16) == "gemv-silu_mul,2048,8192,bfloat16"
    assert triton_gemv.tile_for(torch.randn(1, 128), torch.randn(80, 128), "none") is None


@pytest.mark.parametrize("bias", [False, True])
def test_layer_functions_give_the_unfused_results_through_the_fused_kernel(monkeypatch, bias):
    """layers.norm_linear and silu_mul_linear with a tile for every product (as a GPU's table
    would hold) against the same calls taking the unfused path: the stream and outputs agree."""
    from services.model import layers
    from services.model.parallel import ParallelContext

    ctx = ParallelContext()
    norm = layers.RMSNorm(128, EPS)
    qkv = layers.ColumnParallelLinear(128, 96, ctx, bias=bias)
    down = layers.RowParallelLinear(64, 128, ctx, bias=bias)
    for i, param in enumerate([norm.weight, qkv.weight, down.weight]
                              + ([qkv.bias, down.bias] if bias else [])):
        param.data = randn(*param.shape, seed=20 + i) / 4
    x, residual, gate_up = randn(1, 128, seed=30), randn(1, 128, seed=31), randn(1, 128, seed=32)

    def outputs():
        return (*layers.norm_linear(x, residual, norm, qkv), *layers.norm_linear(x, None, norm, qkv),
                layers.silu_mul_linear(gate_up, down))

    for module in (norm, qkv, down):
        module.to(DEVICE)
    monkeypatch.setattr(layers, "FUSED_GEMVS", False)
    unfused = outputs()
    monkeypatch.setattr(layers, "FUSED_GEMVS", True)
    monkeypatch.setattr(layers, "_gemv_tile", lambda x, w, prologue: Tile(16, 64))
    for got, want in zip(outputs(), unfused, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

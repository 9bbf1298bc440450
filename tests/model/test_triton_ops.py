"""The fused Triton kernels against the plain-torch layers they replace. The kernels run on DEVICE
(compiled on a GPU; elsewhere Triton's interpreter, which tests/conftest.py sets), the references
on CPU tensors, where the layers take their plain-torch path."""

from __future__ import annotations

import pytest
import torch

from services.model.layers import RMSNorm, apply_rotary

triton_ops = pytest.importorskip("services.model.triton_ops")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def on(*tensors):
    """Copies of CPU tensors on the kernels' device (the CPU ones stay the reference's)."""
    return [t.to(DEVICE, copy=True) for t in tensors]


def norm(hidden: int, eps: float = 1e-5) -> RMSNorm:
    layer = RMSNorm(hidden, eps)
    layer.weight.data = 1.0 + 0.1 * randn(hidden, seed=7)
    return layer


@pytest.mark.parametrize("hidden", [128, 96])  # a power of two, and one the block masks
def test_fused_add_rms_norm_equals_the_torch_norm(hidden):
    layer = norm(hidden)
    x, residual = randn(5, hidden, seed=1), randn(5, hidden, seed=2)
    dx, dres, dw = on(x, residual, layer.weight)
    out, res_out = triton_ops.fused_add_rms_norm(dx, dres, dw, layer.eps)
    ref_out, ref_res = layer(x, residual)  # CPU tensors: the torch reference path
    torch.testing.assert_close(res_out.cpu(), ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-6, atol=1e-6)
    alone, same = triton_ops.fused_add_rms_norm(dx, None, dw, layer.eps)
    torch.testing.assert_close(alone.cpu(), layer(x)[0], rtol=1e-6, atol=1e-6)
    assert same is dx


def test_fused_add_rms_norm_rounds_like_torch_in_bf16():
    layer = norm(256)
    layer.weight.data = layer.weight.data.bfloat16()
    x, residual = randn(4, 256, dtype=torch.bfloat16, seed=3), randn(4, 256, dtype=torch.bfloat16)
    out, res_out = triton_ops.fused_add_rms_norm(*on(x, residual, layer.weight), layer.eps)
    ref_out, ref_res = layer(x, residual)
    # About a bf16 step: the GPU rounds to nearest like torch, Triton's interpreter may
    # truncate, and the mean is summed in another order.
    torch.testing.assert_close(res_out.cpu(), ref_res, rtol=2**-7, atol=0)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=2**-5, atol=2**-6)


def test_silu_and_mul_equals_torch():
    gate_up = randn(3, 2 * 1500, seed=4)  # two column blocks, the second partly masked
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(triton_ops.silu_and_mul(*on(gate_up)).cpu(),
                               torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_rotary_inplace_rotates_q_and_k_and_leaves_v():
    from services.model.layers import RotaryEmbedding

    heads, kv_heads, d, n = 4, 2, 16, 6
    qkv = randn(n, (heads + 2 * kv_heads) * d, seed=5)
    cos, sin = RotaryEmbedding(d, 10000.0, None).cos_sin(torch.arange(3, 3 + n), torch.float32)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    expected_q = apply_rotary(q.reshape(n, heads, d), cos, sin).reshape(n, -1)
    expected_k = apply_rotary(k.reshape(n, kv_heads, d), cos, sin).reshape(n, -1)
    expected_v = v.clone()
    qkv_d, cos_d, sin_d = on(qkv, cos, sin)
    triton_ops.rotary_inplace(qkv_d, cos_d, sin_d, heads, kv_heads, d)
    q, k, v = qkv_d.cpu().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    torch.testing.assert_close(q, expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, expected_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, expected_v)


def test_rotary_and_cache_rotates_and_writes_the_slots():
    from services.model.attention import write_kv
    from services.model.layers import RotaryEmbedding, split_qkv_rotated

    heads, kv_heads, d, n = 4, 2, 16, 5
    qkv = randn(n, (heads + 2 * kv_heads) * d, seed=8)
    cos, sin = RotaryEmbedding(d, 10000.0, None).cos_sin(torch.arange(7, 7 + n), torch.float32)
    slots = torch.tensor([3, 9, 0, 22, 17])
    expected_cache = randn(2, 6, 4, kv_heads, d, seed=9)  # slots not written keep their values
    cache = expected_cache.clone()
    q, k, v = split_qkv_rotated(qkv.clone(), cos, sin, heads, kv_heads, d)
    write_kv(expected_cache, k, v, slots)
    qkv, cos, sin, cache, slots = on(qkv, cos, sin, cache, slots)
    triton_ops.rotary_and_cache(qkv, cos, sin, cache, slots, heads, kv_heads, d)
    torch.testing.assert_close(cache.cpu(), expected_cache, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, : heads * d].cpu(), q.reshape(n, -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        triton_ops.rotary_and_cache(qkv, cos, sin, cache.double(), slots, heads, kv_heads, d)


def test_argmax_rows_picks_the_first_maximum_like_torch():
    logits = randn(4, 9000, seed=10)  # three chunks, the last partly masked
    logits[1, 8999] = 50.0
    logits[2, 4100] = logits[2, 300] = 60.0  # a tie across chunks: the first wins
    logits[3] = 1.0  # all equal
    logits = logits.to(DEVICE)
    assert triton_ops.argmax_rows(logits).tolist() == logits.argmax(-1).tolist()
    assert triton_ops.argmax_rows(logits[:, :100]).tolist() == logits[:, :100].argmax(-1).tolist()
    assert triton_ops.argmax_rows(logits[:0]).shape == (0,)

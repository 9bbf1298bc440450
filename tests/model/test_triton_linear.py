"""The Triton skinny matmul (compiled on a GPU, Triton's interpreter elsewhere) against torch, and
the measured table that decides where it runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

triton_linear = pytest.importorskip("services.model.triton_linear")
Tile = triton_linear.Tile
PROLOGUES = pytest.importorskip("services.model.triton_gemv").PROLOGUES


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("tile", [Tile(16, 32), Tile(32, 32, 2), Tile(64, 16, 4)])
def test_skinny_matmul_equals_linear(rows, tile):
    x, w = randn(rows, 128, seed=1), randn(80, 128, seed=2)  # 80 = a masked last N tile
    torch.testing.assert_close(triton_linear.skinny_matmul(x, w, tile), F.linear(x, w),
                               rtol=1e-5, atol=1e-5)


def test_a_split_product_sums_its_partials_in_order_and_leaves_its_tickets_at_zero():
    """The last split of each n-tile sums the partials (no second kernel) and resets its ticket:
    the next launch (the next layer, a graph replay) finds them at zero and gives the same bits,
    the partials' sum rounded once."""
    x, w = randn(7, 256, seed=37).bfloat16(), randn(96, 256, seed=38).bfloat16()
    tile = Tile(16, 32, 4)
    first = triton_linear.skinny_matmul(x, w, tile)
    tickets = triton_linear._ticket_buffer(x.device)
    assert not tickets.any()
    assert torch.equal(triton_linear.skinny_matmul(x, w, tile), first) and not tickets.any()
    k_splits = [torch.cat([torch.arange(k, k + 32) for k in range(s * 32, 256, 128)])
                for s in range(4)]
    partials = [F.linear(x[:, ks].float(), w[:, ks].float()) for ks in k_splits]
    in_order = ((partials[0] + partials[1]) + partials[2]) + partials[3]
    torch.testing.assert_close(first.float(), in_order, rtol=2**-7, atol=2**-7)  # its rounding


def test_skinny_matmul_bf16_and_float32_output():
    x, w = randn(3, 64, seed=3).bfloat16(), randn(48, 64, seed=4).bfloat16()
    expected = F.linear(x.float(), w.float())
    got = triton_linear.skinny_matmul(x, w, Tile(16, 32, 2), out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # bf16 products are exact
    rounded = triton_linear.skinny_matmul(x, w, Tile(16, 32))
    assert rounded.dtype == torch.bfloat16
    torch.testing.assert_close(rounded.float(), expected, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("rows", [1, 6, 33])
@pytest.mark.parametrize("tile", [Tile(16, 32), Tile(32, 64, 1, 2, 8)])
def test_skinny_matmul_argmax_takes_torchs_argmax_of_the_logits_it_writes(rows, tile):
    x, w = randn(rows, 64, seed=31), randn(90, 64, seed=32)  # 90 = a masked last tile
    w[70] = w[3]  # a tie across tiles: the first index wins
    x[0] = 0.0  # every logit of row 0 ties at 0
    logits, ids = triton_linear.skinny_matmul_argmax(x, w, tile, num_valid=80)
    torch.testing.assert_close(logits, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, logits[:, :80].argmax(-1)), "columns past num_valid never win"
    assert ids[0] == 0


def test_skinny_matmul_argmax_counts_nan_as_the_largest_and_refuses_splits():
    x, w = randn(2, 32, seed=33), randn(40, 32, seed=34)
    w[25, 0] = float("nan")
    _, ids = triton_linear.skinny_matmul_argmax(x, w, Tile(16, 32), num_valid=40)
    assert ids.tolist() == [25, 25]
    with pytest.raises(ValueError, match="do not fit"):
        triton_linear.skinny_matmul_argmax(x, w, Tile(16, 16, 2), num_valid=40)
    with pytest.raises(ValueError, match="do not fit"):
        triton_linear.skinny_matmul_argmax(x, w, Tile(16, 32), num_valid=41)


def test_the_lm_head_takes_its_greedy_ids_in_its_epilogue_as_apart():
    """ParallelLMHead.logits_and_greedy with the skinny tile (the epilogue's argmax) against the
    same head's logits and torch's argmax."""
    from unittest import mock

    from services.model import layers
    from services.model.parallel import ParallelContext

    head = layers.ParallelLMHead(100, 32, ParallelContext())
    with torch.no_grad():
        head.weight.copy_(randn(*head.weight.shape, seed=35))
    head = head.to(DEVICE)
    hidden = randn(5, 32, seed=36)
    with mock.patch.object(layers, "uses_triton", lambda t: True), \
            mock.patch.object(triton_linear, "tile_for", lambda *a: Tile(32, 32)):
        logits, ids = head.logits_and_greedy(hidden)
    assert logits.shape == (5, 100) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(hidden, head.weight)[:, :100], rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, logits.argmax(-1))


def silu_mul_of(x, w):
    """The unfused pair as the model runs it: [gate | up] in x's dtype, then SiLU x up."""
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("rows", [2, 16, 33])
@pytest.mark.parametrize("tile", [Tile(16, 32), Tile(32, 64, 1, 2, 8)])
def test_gate_up_silu_equals_the_pair_apart(rows, tile):
    x, w = randn(rows, 128, seed=5), randn(2 * 48, 128, seed=6) / 8  # 48 = a masked last tile
    torch.testing.assert_close(triton_linear.gate_up_silu(x, w, tile), silu_mul_of(x, w),
                               rtol=1e-5, atol=1e-5)


def test_gate_up_silu_in_bf16_within_the_pairs_rounding():
    x, w = randn(4, 64, seed=7).bfloat16(), (randn(64, 64, seed=8) / 8).bfloat16()
    gate, up = F.linear(x.float(), w.float()).bfloat16().chunk(2, dim=-1)
    expected = (F.silu(gate.float()).bfloat16().float() * up.float()).bfloat16()
    got = triton_linear.gate_up_silu(x, w, Tile(16, 32))
    assert got.dtype == torch.bfloat16 and got.shape == (4, 32)
    # The sums run in another order than torch's, so gate or up may round one bf16 step apart,
    # which the SiLU and the product carry to at most a few steps of the output.
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-5, atol=2**-8)


def test_gate_up_silu_refuses_what_it_cannot_run():
    x = randn(2, 64)
    assert not triton_linear.fits_gate_up_silu(x, randn(64, 64), Tile(16, 32, 2))  # split K
    assert not triton_linear.fits_gate_up_silu(x, randn(63, 64), Tile(16, 32))  # odd [gate | up]
    with pytest.raises(ValueError, match="do not fit"):
        triton_linear.gate_up_silu(x, randn(63, 64), Tile(16, 32))
    assert triton_linear.silu_table_key(3, 96, 64, torch.bfloat16) == "silu-16,96,64,bfloat16"
    assert triton_linear.gate_up_silu_tile_for(torch.randn(4, 64), torch.randn(96, 64)) is None


def rope_case(rows, heads, kv_heads, d=32, k=64, dtype=torch.float32):
    """(x, w, cos, sin, cache, slots): cos/sin as RotaryEmbedding makes them (each half twice),
    rows on distinct random slots of a [2, 6 blocks, 4, kv_heads, d] cache."""
    x = randn(rows, k, seed=11).to(dtype)
    w = (randn((heads + 2 * kv_heads) * d, k, seed=12) / 8).to(dtype)
    angles = randn(rows, d // 2, seed=13)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    cache = torch.zeros(2, 6, 4, kv_heads, d, dtype=dtype, device=DEVICE)
    slots = torch.randperm(24, generator=torch.Generator().manual_seed(14))[:rows].to(DEVICE)
    return x, w, cos, sin, cache, slots


def rope_pair(x, w, cos, sin, cache, slots, heads, kv_heads, d):
    """The unfused pair as a GPU runs it: the product (float32 sums, rounded once to x's dtype),
    then q and k rotated in float32 and rounded, and this step's k and v written to the cache."""
    from services.model.layers import apply_rotary

    q, k, v = F.linear(x.float(), w.float()).to(x.dtype).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rotary(q.reshape(-1, heads, d).float(), cos.float(), sin.float()).to(x.dtype)
    k = apply_rotary(k.reshape(-1, kv_heads, d).float(), cos.float(), sin.float()).to(x.dtype)
    cache = cache.clone()
    cache[0].view(-1, kv_heads, d)[slots] = k
    cache[1].view(-1, kv_heads, d)[slots] = v.reshape(-1, kv_heads, d)
    return q, cache


@pytest.mark.parametrize("rows", [2, 16, 17])
@pytest.mark.parametrize("heads,kv_heads,d,tile", [
    (4, 2, 32, Tile(16, 32)), (4, 2, 32, Tile(64, 16, 1, 2)),  # 1 head, 4 heads a program
    (3, 1, 32, Tile(32, 32)),  # a program across q and k, a last one half empty
    (4, 2, 64, Tile(16, 32)),  # half a head a program
])
def test_qkv_rope_equals_the_product_then_rotary_and_cache(rows, heads, kv_heads, d, tile):
    case = rope_case(rows, heads, kv_heads, d)
    cache = case[4].clone()
    q = triton_linear.qkv_rope(*case[:4], cache, case[5], heads, kv_heads, d, tile)
    q_expected, cache_expected = rope_pair(*case, heads, kv_heads, d)
    torch.testing.assert_close(q, q_expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, cache_expected, rtol=1e-5, atol=1e-5)  # other slots stay 0


def test_qkv_rope_in_bf16_rounds_where_the_pair_rounds():
    x, w, cos, sin, cache, slots = rope_case(4, 4, 2, d=64, dtype=torch.bfloat16)
    q = triton_linear.qkv_rope(x, w, cos, sin, cache, slots, 4, 2, 64, Tile(32, 32))
    q_expected, cache_expected = rope_pair(x, w, cos, sin, torch.zeros_like(cache), slots, 4, 2, 64)
    # The sums run in another order than torch's, so a product may round one bf16 step apart
    # (under Triton's interpreter most do: it rounds float32 to bf16 toward zero, a GPU to the
    # nearest), which the rotation carries to a step or two of the output.
    torch.testing.assert_close(q.float(), q_expected.float(), rtol=2**-5, atol=2**-7)
    torch.testing.assert_close(cache.float(), cache_expected.float(), rtol=2**-5, atol=2**-7)


def test_qkv_rope_refuses_what_it_cannot_run():
    x, w, cos, sin, cache, slots = rope_case(4, 4, 2)
    assert triton_linear.fits_qkv_rope(x, w, cache, 4, 2, 32, Tile(16, 32))
    assert not triton_linear.fits_qkv_rope(x, w, cache, 4, 2, 32, Tile(16, 32, 2))  # split K
    assert not triton_linear.fits_qkv_rope(x, w, cache, 4, 2, 32, Tile(24, 32))  # 24 pairs
    assert not triton_linear.fits_qkv_rope(x, w, cache, 4, 2, 32, Tile(8, 32))  # under 16
    assert not triton_linear.fits_qkv_rope(x, w, cache, 5, 2, 32, Tile(16, 32))  # other heads
    with pytest.raises(ValueError, match="do not fit"):
        triton_linear.qkv_rope(x, w, cos, sin, cache[:, :, :, :1], slots, 4, 2, 32, Tile(16, 32))
    # On CPU tensors there is no GPU table: the pair apart.
    assert triton_linear.qkv_rope_tile_for(torch.randn(4, 64), w.cpu(), cache.cpu(), 4, 2, 32) \
        is None


def test_shapes_the_tile_does_not_fit_are_refused():
    x, w = randn(2, 96), randn(32, 96)
    assert not triton_linear.fits(x, w, Tile(16, 64))  # 96 is not a multiple of 64
    assert not triton_linear.fits(randn(65, 96), w, Tile(16, 32))  # past MAX_ROWS
    with pytest.raises(ValueError, match="do not fit"):
        triton_linear.skinny_matmul(x, w, Tile(16, 64))


def test_row_classes_cover_every_decode_batch():
    assert [triton_linear.row_class(m) for m in (1, 2, 16, 17, 32, 33, 64)] == [1, 16, 16, 32, 32, 64, 64]
    assert triton_linear.table_key(3, 80, 128, torch.bfloat16) == "16,80,128,bfloat16"


def test_tile_lookup_reads_the_table_and_falls_back_to_cublas(tmp_path):
    table = tmp_path / "linear_configs.json"
    table.write_text(json.dumps({"GPU X": {"16,80,128,float32": [16, 32, 2, 3, 4]}}))
    tiles = triton_linear._tiles_of("GPU X", table)
    assert tiles == {"16,80,128,float32": Tile(16, 32, 2, 3, 4)}
    assert triton_linear._tiles_of("GPU Y", table) == {}
    # A GPU of the same chip may run another GPU's tiles: its entry names that GPU.
    table.write_text(json.dumps({"GPU X": {"16,80,128,float32": [16, 32, 2, 3, 4]},
                                 "GPU X lite": "GPU X"}))
    assert triton_linear._tiles_of("GPU X lite", table) == tiles
    # On CPU tensors there is no GPU to look up: cuBLAS's place is torch's own linear.
    assert triton_linear.tile_for(torch.randn(4, 128), torch.randn(80, 128)) is None


def test_the_shipped_table_holds_valid_tiles():
    table = json.loads(triton_linear.SHIPPED_CONFIG_FILE.read_text())
    for device, entries in table.items():
        if isinstance(entries, str):  # runs that GPU's tiles
            assert isinstance(table.get(entries), dict), (device, entries)
            continue
        for key, value in entries.items():
            rows, n, k, dtype = key.split(",")
            assert dtype in ("bfloat16", "float16"), (device, key)
            tile = Tile(*value)
            if rows.startswith("gemv-"):  # a fused batch-1 product (services/model/triton_gemv.py)
                assert rows.removeprefix("gemv-") in PROLOGUES, (device, key)
                assert tile.split_k == 1 and int(k) % tile.block_k == 0, (device, key)
                continue
            if rows.startswith("rope-"):  # qkv with the rotary and cache write in the epilogue
                assert tile.split_k == 1 and tile.block_n >= 16, (device, key)
                assert int(rows.removeprefix("rope-")) in triton_linear.ROW_CLASSES[1:]
                assert int(k) % tile.block_k == 0, (device, key)
                continue
            if rows.startswith("silu-"):  # gate/up with SiLU x up in the epilogue
                rows = rows.removeprefix("silu-")
                assert tile.split_k == 1 and int(n) % 2 == 0 and int(rows) > 1, (device, key)
            assert int(rows) in triton_linear.ROW_CLASSES, (device, key)
            assert int(k) % (tile.block_k * tile.split_k) == 0, (device, key)
            assert tile.block_n >= 16 and tile.block_k >= 16


def test_the_layer_runs_qkv_with_the_rotary_fused_as_it_runs_them_apart():
    """layers.norm_qkv_rotated with the table's fused tile against the same layer without it,
    every kernel Triton's (the GPU path, here in the interpreter)."""
    from unittest import mock

    from services.model import layers
    from services.model.parallel import ParallelContext

    proj = layers.QKVParallelLinear(64, 16, 4, 2, ParallelContext())
    norm = layers.RMSNorm(64, 1e-5)
    with torch.no_grad():
        proj.weight.copy_(randn(*proj.weight.shape, seed=21) / 4)
        norm.weight.copy_(1 + randn(64, seed=22) / 10)
    proj, norm = proj.to(DEVICE), norm.to(DEVICE)
    x, residual, angles = randn(5, 64, seed=23), randn(5, 64, seed=24), randn(5, 8, seed=25)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.tensor([3, 9, 17, 20, 30], device=DEVICE)
    out = []
    for tile in (None, Tile(16, 32)):  # two heads of 16 a program
        cache = torch.zeros(2, 8, 4, 2, 16, device=DEVICE)
        with mock.patch.object(layers, "uses_triton", lambda t: True), \
                mock.patch.object(triton_linear, "qkv_rope_tile_for", lambda *a, t=tile: t):
            q, stream = layers.norm_qkv_rotated(x, residual, norm, proj, cos, sin, cache, slots)
        out.append((q, stream, cache))
    (q, stream, cache), (q_fused, stream_fused, cache_fused) = out
    torch.testing.assert_close(q_fused, q, rtol=1e-5, atol=1e-5)
    assert torch.equal(stream_fused, stream) and torch.equal(stream, x + residual)
    torch.testing.assert_close(cache_fused, cache, rtol=1e-5, atol=1e-5)
    assert cache.abs().sum() > 0

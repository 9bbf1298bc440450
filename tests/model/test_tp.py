"""Tensor parallelism on CPU: real gloo process groups, compared with TP=1 in this process.

One spawn of 4 ranks covers every shape, each rank passing its own ParallelContext:

    rank          0      1      2      3
    TP=4         [ tiny, then gqa, world group of 4 ]
    TP=2         [ tiny, pair 0-1 ] [ gqa, pair 2-3 ]
    TP=2 × PP=2  [ tiny, pair 0-1 ] [ gqa, pair 2-3 ]  each rank runs its shard of both stages in
                                                       turn, the residual stream handed over in memory

gqa has 2 KV heads, so at TP=4 each KV head is replicated on two ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from services.model import (
    ModelConfig,
    ParallelContext,
    close_tp_group,
    count_collectives,
    init_tp_group,
    load_model,
)

from .paged import PagedRunner

WORLD_SIZE = 4
NUM_NEW = 33  # prefill + 32 decode steps
PROMPT = list(range(3, 24))  # 21 tokens: crosses a 16-token block
ATOL = 1e-4
RUNS = [("tiny", 4, 1), ("gqa", 4, 1), ("tiny", 2, 1), ("gqa", 2, 1), ("tiny", 2, 2), ("gqa", 2, 2)]
SINGLE_STAGE_RUNS = [run[:2] for run in RUNS if run[2] == 1]


def _rank_main(rank: int, init_file: str, dirs: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx4 = init_tp_group(f"file://{init_file}", rank, WORLD_SIZE, backend="gloo")  # CPU tensors, GPU or not
    results = {f"{name}/4/1": _run_rank(Path(dirs[name]), [ctx4]) for name in ("tiny", "gqa")}
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes both
    pair = dict(tp_rank=rank % 2, tp_size=2, tp_group=pair_groups[rank // 2])
    name = ("tiny", "gqa")[rank // 2]
    results[f"{name}/2/1"] = _run_rank(Path(dirs[name]), [ParallelContext(**pair)])
    stages = [ParallelContext(**pair, pp_rank=k, pp_size=2) for k in range(2)]
    results[f"{name}/2/2"] = _run_rank(Path(dirs[name]), stages)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    close_tp_group(ctx4)


def _run_rank(model_dir: Path, stage_ctxs: list[ParallelContext]) -> dict:
    stages = [load_model(model_dir, ctx) for ctx in stage_ctxs]
    with count_collectives() as counts:
        tokens, logits = PagedRunner(stages).generate({"a": PROMPT}, NUM_NEW)
    return {
        "tokens": tokens["a"],
        "logits": logits["a"],
        "counts": dict(counts),
        "shard_mismatches": _shard_mismatches(stages, model_dir, stage_ctxs[0]),
        "param_bytes": _param_bytes(stages[0]),
    }


def _param_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of unique parameters: replicated norms, k/v projections, and the rest."""
    sizes = {"norm": 0, "qkv": 0, "other": 0}
    for name, p in model.named_parameters():
        kind = "norm" if "norm" in name else "qkv" if "qkv_proj" in name else "other"
        sizes[kind] += p.numel() * p.element_size()
    return sizes


def _expected_shards(full: dict[str, torch.Tensor], config: ModelConfig, ctx: ParallelContext) -> dict:
    """The slice of every full checkpoint tensor that `ctx.tp_rank` must hold, written directly."""
    r, p, d = ctx.tp_rank, ctx.tp_size, config.head_dim
    q_rows = config.num_attention_heads // p * d
    kv_heads = config.num_key_value_heads
    first_kv, num_kv = (r * kv_heads // p, 1) if p >= kv_heads else (r * kv_heads // p, kv_heads // p)
    inter = config.intermediate_size // p
    vocab = config.vocab_size // p

    def rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return t[start : start + n]

    expected = {"model.embed_tokens.weight": rows(full["model.embed_tokens.weight"], r * vocab, vocab)}
    head = full.get("lm_head.weight", full["model.embed_tokens.weight"])
    expected["lm_head.weight"] = rows(head, r * vocab, vocab)
    expected["model.norm.weight"] = full["model.norm.weight"]
    for i in range(config.num_hidden_layers):
        f = lambda name: full[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        prefix = f"model.layers.{i}"
        expected[f"{prefix}.self_attn.qkv_proj.weight"] = torch.cat(
            [rows(f("self_attn.q_proj"), r * q_rows, q_rows)]
            + [rows(f(f"self_attn.{kv}_proj"), first_kv * d, num_kv * d) for kv in "kv"]
        )
        expected[f"{prefix}.self_attn.o_proj.weight"] = f("self_attn.o_proj")[:, r * q_rows : (r + 1) * q_rows]
        expected[f"{prefix}.mlp.gate_up_proj.weight"] = torch.cat(
            [rows(f("mlp.gate_proj"), r * inter, inter), rows(f("mlp.up_proj"), r * inter, inter)]
        )
        expected[f"{prefix}.mlp.down_proj.weight"] = f("mlp.down_proj")[:, r * inter : (r + 1) * inter]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"{prefix}.{norm}.weight"] = f(norm)
    return expected


def _shard_mismatches(stages: list[torch.nn.Module], model_dir: Path, ctx: ParallelContext) -> list[str]:
    """Names whose shard differs from the expected slice; the stages together hold every tensor."""
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}
    expected = _expected_shards(full, stages[0].config, ctx)
    held = {}
    for stage in stages:
        held.update(stage.named_parameters(remove_duplicate=False))
    if set(held) != set(expected):
        return [f"names differ: {sorted(set(held) ^ set(expected))}"]
    return [name for name, t in expected.items() if not torch.equal(held[name], t)]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, gqa_dir: Path) -> dict:
    out_dir = tmp_path_factory.mktemp("tp")
    dirs = {"tiny": str(tiny_dir), "gqa": str(gqa_dir)}
    mp.spawn(_rank_main, args=(str(out_dir / "rendezvous"), dirs, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    results: dict[str, list[dict]] = {}
    for rank_results in per_rank:
        for key, value in rank_results.items():
            results.setdefault(key, []).append(value)
    return results


@pytest.fixture(scope="module")
def tp1_reference(tiny_dir: Path, gqa_dir: Path) -> dict:
    reference = {}
    for name, model_dir in (("tiny", tiny_dir), ("gqa", gqa_dir)):
        tokens, logits = PagedRunner([load_model(model_dir, ParallelContext())]).generate({"a": PROMPT}, NUM_NEW)
        reference[name] = {"tokens": tokens["a"], "logits": logits["a"], "dir": model_dir}
    return reference


@pytest.mark.parametrize(("name", "tp", "pp"), RUNS)
def test_tokens_and_logits_equal_tp1(tp_results: dict, tp1_reference: dict, name: str, tp: int, pp: int) -> None:
    ranks = tp_results[f"{name}/{tp}/{pp}"]
    assert len(ranks) == tp
    expected = tp1_reference[name]
    assert len(set(expected["tokens"])) >= 8  # a looping continuation would make this check weak
    for rank in ranks:
        assert rank["tokens"] == expected["tokens"]
        assert (rank["logits"] - expected["logits"]).abs().max().item() <= ATOL


@pytest.mark.parametrize(("name", "tp", "pp"), RUNS)
def test_each_shard_is_the_matching_slice_of_the_full_weight(tp_results: dict, name: str, tp: int, pp: int) -> None:
    for rank in tp_results[f"{name}/{tp}/{pp}"]:
        assert rank["shard_mismatches"] == []


@pytest.mark.parametrize(("name", "tp"), SINGLE_STAGE_RUNS)
def test_parameter_bytes_per_rank(tp_results: dict, tp1_reference: dict, name: str, tp: int) -> None:
    """Norms are replicated; everything else is 1/tp of the total, except q/k/v, whose KV part is
    1/num_kv_heads (not 1/tp) per rank once tp > num_kv_heads (replicated KV heads)."""
    config = ModelConfig.from_dir(tp1_reference[name]["dir"])
    total = load_model(tp1_reference[name]["dir"], ParallelContext())
    full = _param_bytes(total)
    q_share = config.num_attention_heads / (config.num_attention_heads + 2 * config.num_key_value_heads)
    kv_fraction = max(1 / tp, 1 / config.num_key_value_heads)
    expected_qkv = full["qkv"] * (q_share / tp + (1 - q_share) * kv_fraction)
    for rank in tp_results[f"{name}/{tp}/1"]:
        sizes = rank["param_bytes"]
        assert sizes["norm"] == full["norm"]
        assert sizes["other"] == full["other"] // tp
        assert sizes["qkv"] == pytest.approx(expected_qkv, rel=1e-9)
        sharded = sizes["other"] + sizes["qkv"]
        assert sharded <= (full["other"] + full["qkv"]) / tp * (1.2 if kv_fraction > 1 / tp else 1.0)


@pytest.mark.parametrize(("name", "tp", "pp"), RUNS)
def test_two_all_reduces_per_layer_per_forward(
    tp_results: dict, tp1_reference: dict, name: str, tp: int, pp: int
) -> None:
    """Per forward: 2 per layer (o_proj, down_proj) + 1 for the embedding (first stage); 1 all-gather
    of the logits (last stage). With PP the rank runs its shard of every stage, so the sums match."""
    num_layers = ModelConfig.from_dir(tp1_reference[name]["dir"]).num_hidden_layers
    num_forwards = NUM_NEW  # one prefill + NUM_NEW - 1 decode steps
    for rank in tp_results[f"{name}/{tp}/{pp}"]:
        assert rank["counts"] == {"all_reduce": num_forwards * (2 * num_layers + 1), "all_gather": num_forwards}


def test_kv_cache_per_rank_holds_its_share_of_heads(gqa_dir: Path) -> None:
    from services.model import kv_bytes_per_block

    config = ModelConfig.from_dir(gqa_dir)  # 2 KV heads
    one = kv_bytes_per_block(config, ParallelContext(), 2, 16, torch.float32)
    assert one == 2 * 2 * 16 * 2 * config.head_dim * 4
    fake_group = object()
    per_rank = {
        tp: kv_bytes_per_block(config, ParallelContext(0, tp, fake_group), 2, 16, torch.float32) for tp in (2, 4)
    }
    assert per_rank == {2: one // 2, 4: one // 2}  # 1 KV head per rank; at TP=4 it is a replica
    assert math.isclose(per_rank[4] / one, 1 / config.num_key_value_heads)

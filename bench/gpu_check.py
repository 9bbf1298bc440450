"""GPU checks in one run: bf16 parity with transformers (in-process logits and the served path),
PP=2 on one GPU over the UCX stage link, and serving throughput.

    python bench/gpu_check.py [--skip-pp]

Needs CUDA. Prints markdown sections for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from deploy.launcher import LocalMesh, MeshSpec  # noqa: E402
from meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from services.model import ParallelContext, build_attention_metadata, load_model  # noqa: E402
from services.model.attention import allocate_kv_caches  # noqa: E402
from services.model.default_model import ensure_default_model  # noqa: E402
from tests.checkpoints import GQA_CONFIG, save_hf_llama  # noqa: E402

PROMPTS = [[1, 50, 60, 70, 80], [1] + list(range(100, 160)), [1, 7], [1] + [33] * 20]
NUM_TOKENS = 32


def our_logits(model_dir: Path, ids: list[int], dtype) -> torch.Tensor:
    """One prefill of ids through our paged model on cuda: [len(ids), vocab] float32."""
    model = load_model(model_dir, ParallelContext(), None, dtype=dtype, device="cuda")
    n_blocks = -(-len(ids) // 16)
    caches = allocate_kv_caches(model.config, model.ctx, len(model.layer_range), n_blocks, 16,
                                dtype, "cuda")
    positions, meta = build_attention_metadata([len(ids)], [len(ids)], [list(range(n_blocks))],
                                               16, "cuda")
    with torch.inference_mode():
        hidden = model(positions, meta, caches, input_ids=torch.tensor(ids, device="cuda"))
        return model.compute_logits(hidden).float()


def hf_model(model_dir: Path, dtype):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).cuda().eval()


def hf_logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids], device="cuda")).logits[0].float()


def hf_greedy(model, ids, n) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def served(model_dir: Path, pp: int = 1, extra_env: dict | None = None,
           tp: int = 1) -> tuple[list, LocalMesh]:
    os.environ.update(extra_env or {})
    mesh = LocalMesh(MeshSpec(model=str(model_dir), tp=tp, pp=pp, port=0,
                              worker_args=("--kv-cache-memory-gb", "2")))
    mesh.start(timeout_s=300)
    try:
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            stub = pb_grpc.GenerationStub(channel)

            def one(p):
                return [t for m in stub.Generate(pb.GenerateRequest(
                    prompt_token_ids=p, sampling=pb.SamplingParams(
                        max_tokens=NUM_TOKENS, ignore_eos=True))) for t in m.token_ids]

            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                return list(pool.map(one, PROMPTS)), mesh
    finally:
        mesh.stop()


def compare_greedy(name: str, got: list[list[int]], expected: list[list[int]], fp32_model,
                   tolerance: float) -> bool:
    """Exact match, or a first divergence at a near tie: there the two tokens' fp32 logits
    differ by less than the bf16 error measured on this model (so bf16 may pick either).
    After a divergence the two continuations have different contexts and are not compared."""
    print(f"\n{name}: {sum(g == e for g, e in zip(got, expected))}/{len(got)} prompts give "
          f"identical {NUM_TOKENS}-token greedy output")
    ok = True
    for prompt, g, e in zip(PROMPTS, got, expected):
        if g == e:
            continue
        i = next(i for i, (a, b) in enumerate(zip(g, e)) if a != b)
        logits = hf_logits(fp32_model, prompt + e[:i])[-1]
        margin = float(logits[e[i]] - logits[g[i]])
        near_tie = abs(margin) <= tolerance
        ok &= near_tie
        print(f"  - diverges at token {i}: fp32 logit margin between the two choices "
              f"{margin:.3f} ({'a near tie, within' if near_tie else 'NOT within'} the bf16 "
              f"error {tolerance:.3f})")
    return ok


def parity_section(name: str, model_dir: Path) -> tuple[list, object, float, bool]:
    ids = PROMPTS[1]
    hf32 = hf_model(model_dir, torch.float32)
    fp32 = hf_logits(hf32, ids)
    hf16 = hf_model(model_dir, torch.bfloat16)
    ref16 = hf_logits(hf16, ids)
    ours16 = our_logits(model_dir, ids, torch.bfloat16)
    ours32 = our_logits(model_dir, ids, torch.float32)
    bf16_error = float((ref16 - fp32).abs().max())
    print(f"\n#### {name}: logits, prompt of {len(ids)} tokens (max abs diff)\n")
    print("| pair | max abs diff |\n|---|---:|")
    print(f"| ours fp32 vs transformers fp32 | {(ours32 - fp32).abs().max():.2e} |")
    print(f"| ours bf16 vs transformers bf16 | {(ours16 - ref16).abs().max():.3f} |")
    print(f"| ours bf16 vs transformers fp32 | {(ours16 - fp32).abs().max():.3f} |")
    print(f"| transformers bf16 vs transformers fp32 (the bf16 error) | {bf16_error:.3f} |")
    print(f"| (largest fp32 logit magnitude) | {fp32.abs().max():.2f} |")
    logits_ok = float((ours16 - fp32).abs().max()) <= 1.5 * bf16_error
    expected = [hf_greedy(hf16, p, NUM_TOKENS) for p in PROMPTS]
    got, _ = served(model_dir)
    tokens_ok = compare_greedy("Served path (worker on cuda, bf16) vs transformers bf16 generate",
                               got, expected, hf32, bf16_error)
    return got, hf32, bf16_error, logits_ok and tokens_ok


def pp_section(model_dir: Path, pp1_tokens, hf32, tolerance: float) -> bool:
    got, mesh = served(model_dir, pp=2, extra_env={"UCX_PROTO_INFO": "y"})
    print("\n#### PP=2 on one GPU (two worker processes, UCX stage link, bf16)")
    ok = compare_greedy("PP=2 vs PP=1 (both served)", got, pp1_tokens, hf32, tolerance)
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    for log in sorted(mesh.log_dir.glob("*worker*.log")):
        (out / log.name).write_text(log.read_text(errors="replace"))
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-pp", action="store_true")
    p.add_argument("--only-pp", action="store_true", help="PP=2 vs PP=1 only")
    p.add_argument("--only-tp", type=int, default=0, help="TP=N over NCCL vs TP=1 only")
    a = p.parse_args()
    print(f"### GPU checks\n\nMachine: {machine()}")
    tiny = ensure_default_model()
    if a.only_tp:
        tp1, _ = served(tiny)
        tpn, _ = served(tiny, tp=a.only_tp)
        hf32 = hf_model(tiny, torch.float32)
        ok = compare_greedy(f"TP={a.only_tp} (NCCL, one GPU per rank) vs TP=1, served, bf16",
                            tpn, tp1, hf32, 0.8)
        sys.exit(0 if ok else 1)
    if a.only_pp:
        pp1, _ = served(tiny)
        hf32 = hf_model(tiny, torch.float32)
        sys.exit(0 if pp_section(tiny, pp1, hf32, 0.8) else 1)
    pp1, hf32, tolerance, ok = parity_section("default tiny model", tiny)
    gqa = save_hf_llama(Path(tempfile.mkdtemp()), tiny, **GQA_CONFIG)
    ok &= parity_section("GQA, llama3 rope, untied (written by transformers)", gqa)[-1]
    if not a.skip_pp:
        ok &= pp_section(tiny, pp1, hf32, tolerance)
    print(f"\nverdict: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

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


def served(model_dir: Path, pp: int = 1, extra_env: dict | None = None) -> tuple[list, LocalMesh]:
    os.environ.update(extra_env or {})
    mesh = LocalMesh(MeshSpec(model=str(model_dir), pp=pp, port=0,
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


def parity_section(name: str, model_dir: Path) -> None:
    ids = PROMPTS[1]
    fp32 = hf_logits(hf_model(model_dir, torch.float32), ids)
    hf16 = hf_model(model_dir, torch.bfloat16)
    ref16 = hf_logits(hf16, ids)
    ours16 = our_logits(model_dir, ids, torch.bfloat16)
    ours32 = our_logits(model_dir, ids, torch.float32)
    print(f"\n#### {name}: logits, prompt of {len(ids)} tokens (max abs diff)\n")
    print("| pair | max abs diff |\n|---|---:|")
    print(f"| ours fp32 vs transformers fp32 | {(ours32 - fp32).abs().max():.2e} |")
    print(f"| ours bf16 vs transformers bf16 | {(ours16 - ref16).abs().max():.3f} |")
    print(f"| ours bf16 vs transformers fp32 | {(ours16 - fp32).abs().max():.3f} |")
    print(f"| transformers bf16 vs transformers fp32 | {(ref16 - fp32).abs().max():.3f} |")
    print(f"| (logit range of fp32) | {fp32.abs().max():.2f} |")
    expected = [hf_greedy(hf16, p, NUM_TOKENS) for p in PROMPTS]
    got, _ = served(model_dir)
    same = [g == e for g, e in zip(got, expected)]
    print(f"\nServed path (gateway -> scheduler -> worker on cuda, bf16), {len(PROMPTS)} prompts "
          f"batched, {NUM_TOKENS} greedy tokens: identical to transformers bf16 generate for "
          f"{sum(same)}/{len(same)} prompts")
    for g, e in zip(got, expected):
        if g != e:
            first = next(i for i, (a, b) in enumerate(zip(g, e)) if a != b)
            print(f"  - first difference at token {first}")
    return got


def pp_section(model_dir: Path, pp1_tokens) -> None:
    got, mesh = served(model_dir, pp=2, extra_env={"UCX_PROTO_INFO": "y"})
    print(f"\n#### PP=2 on one GPU (two worker processes, UCX stage link)\n")
    print(f"Greedy tokens identical to PP=1 for {sum(a == b for a, b in zip(got, pp1_tokens))}"
          f"/{len(got)} prompts.")
    lines = []
    for child in mesh.children:
        if "worker" in child.name:
            lines += [ln for ln in child.log.read_text(errors="replace").splitlines()
                      if "cuda" in ln.lower() and ("ipc" in ln or "copy" in ln or "|" in ln)]
    print("UCX protocol lines mentioning CUDA (UCX_PROTO_INFO=y):")
    for ln in lines[:20]:
        print("    " + ln)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-pp", action="store_true")
    a = p.parse_args()
    print(f"### GPU checks\n\nMachine: {machine()}")
    tiny = ensure_default_model()
    pp1 = parity_section("default tiny model", tiny)
    gqa = save_hf_llama(Path(tempfile.mkdtemp()), tiny, **GQA_CONFIG)
    parity_section("GQA, llama3 rope, untied (written by transformers)", gqa)
    if not a.skip_pp:
        pp_section(tiny, pp1)


if __name__ == "__main__":
    main()

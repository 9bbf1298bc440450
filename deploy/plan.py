"""`meshserve plan`: every TP x PP x DP layout of a model on a cluster, what each costs in memory
and links, and the one to run.

    meshserve plan --model DIR|config.json [--gpu H200-SXM] [--gpu-memory-gb M] [--gpus-per-node G]
                   [--nodes N] [--intra-node nvlink4] [--inter-node ib-400g]
                   [--intra-node-gbps B] [--inter-node-gbps B] [--context C] [--batch B]
                   [--dtype bfloat16] [--objective throughput|latency] [--json] [--helm-values FILE]

The arithmetic (the seed's, made exact for the checkpoint's shapes), per GPU of a layout:

    weights   the stage's layers / TP (q, k, v, o, gate, up, down, norms), plus the embedding
              (first stage) and the LM head (last stage), each split by vocabulary over TP
    KV        batch x context x (stage layers) x 2 x (KV heads / TP, at least 1) x head_dim x dtype
    overhead  activations, CUDA graphs and workspaces: OVERHEAD_GB + OVERHEAD_SHARE of the GPU
    fits      weights + KV + overhead <= GPU memory x MEMORY_UTILIZATION

and per decode step of `batch` tokens, which crosses every stage in turn:

    TP        2 all-reduces per layer (and one of the embedding) of batch x hidden x dtype
              bytes, each latency + 2 (TP - 1) / TP x bytes / bandwidth (a ring), and the
              all-gather of the logits, latency + (TP - 1) / TP x batch x vocab x dtype /
              bandwidth; over NVLink inside a node and the network once TP spans nodes
    PP        PP - 1 transfers of batch x hidden x dtype bytes (the residual stream), over the
              network where a stage boundary crosses nodes
    step      (weights + KV read of every stage, per GPU) / HBM bandwidth + the link time

The layouts that fit are ranked by the objective: throughput (the fleet's tokens/s,
DP x batch / step) or latency (the step); ties go to fewer GPUs per replica. Presets of GPUs and
links are data (deploy/plan_presets.json); every figure can be overridden by a flag.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

PRESETS = json.loads(Path(__file__).with_name("plan_presets.json").read_text())
GB = 1e9
OVERHEAD_GB = 2.0  # activations of a step, CUDA graphs, NCCL and allocator workspaces
OVERHEAD_SHARE = 0.04
MEMORY_UTILIZATION = 0.9  # the workers' --gpu-memory-utilization
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a checkpoint's config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # the LM head is the embedding (one copy where one stage holds both)

    @classmethod
    def from_config(cls, raw: dict) -> Shape:
        heads = raw["num_attention_heads"]
        return cls(hidden=raw["hidden_size"], intermediate=raw["intermediate_size"],
                   layers=raw["num_hidden_layers"], heads=heads,
                   kv_heads=raw.get("num_key_value_heads", heads),
                   head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                   vocab=raw["vocab_size"], tied=bool(raw.get("tie_word_embeddings", False)))

    def layer_params(self) -> int:
        return self.layer_matrix_params() + 2 * self.hidden  # two norms

    def layer_matrix_params(self) -> int:
        """q, k, v, o, gate, up, down: what TP splits (the norms are replicated)."""
        h, d = self.hidden, self.head_dim
        attention = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h
        return attention + 3 * h * self.intermediate

    def layer_bytes_per_rank(self, tp: int, dtype_bytes: int) -> float:
        return (self.layer_matrix_params() / tp + 2 * self.hidden) * dtype_bytes

    def params(self) -> int:
        """Every parameter once (a tied LM head counted apart: the last stage holds it)."""
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden

    def head_shared(self, pp: int) -> bool:
        """Whether the LM head is the embedding's own tensor on the one stage holding both."""
        return self.tied and pp == 1


@dataclass(frozen=True)
class Cluster:
    gpu_memory_gb: float
    hbm_gbps: float
    gpus_per_node: int
    nodes: int
    intra_gbps: float
    intra_latency_us: float
    inter_gbps: float
    inter_latency_us: float

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    fits: bool
    weights_gb_per_gpu: float
    kv_gb_per_gpu: float
    overhead_gb_per_gpu: float
    link_ms_per_token: float
    step_ms: float
    tokens_per_s: float
    tp_link: str  # "intra-node" or "inter-node"
    pp_link: str  # "", "intra-node" or "inter-node"


def stage_layers(layers: int, pp: int) -> list[int]:
    """Layers of each stage, as the workers split them by default (earlier stages take more)."""
    base, extra = divmod(layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    return max(1, kv_heads // tp)


def evaluate(shape: Shape, cluster: Cluster, tp: int, pp: int, batch: int, context: int,
             dtype_bytes: int) -> Layout:
    """One layout's memory per GPU (its largest stage), link time and step time."""
    h = shape.hidden
    vocab_per_rank = math.ceil(shape.vocab / tp)
    layer_bytes = shape.layer_bytes_per_rank(tp, dtype_bytes)
    kv_per_layer = batch * context * 2 * kv_heads_per_rank(shape.kv_heads, tp) * shape.head_dim \
        * dtype_bytes
    weights, kv = [], []
    for s, n in enumerate(stage_layers(shape.layers, pp)):
        w = n * layer_bytes
        if s == 0:
            w += vocab_per_rank * h * dtype_bytes  # the embedding
        if s == pp - 1:  # the LM head (unless it is the embedding) and the final norm
            w += (vocab_per_rank * (not shape.head_shared(pp)) + 1) * h * dtype_bytes
        weights.append(w)
        kv.append(n * kv_per_layer)
    overhead = OVERHEAD_GB * GB + OVERHEAD_SHARE * cluster.gpu_memory_gb * GB
    worst = max(range(pp), key=lambda s: weights[s] + kv[s])
    fits = weights[worst] + kv[worst] + overhead <= MEMORY_UTILIZATION * cluster.gpu_memory_gb * GB

    activation = batch * h * dtype_bytes
    tp_inter = tp > cluster.gpus_per_node
    link_s = 0.0
    if tp > 1:
        gbps, latency = ((cluster.inter_gbps, cluster.inter_latency_us) if tp_inter
                         else (cluster.intra_gbps, cluster.intra_latency_us))
        one = latency * 1e-6 + 2 * (tp - 1) / tp * activation / (gbps * GB)
        logits = batch * vocab_per_rank * tp * dtype_bytes
        link_s += (2 * shape.layers + 1) * one \
            + latency * 1e-6 + (tp - 1) / tp * logits / (gbps * GB)
    pp_inter = tp * pp > cluster.gpus_per_node
    if pp > 1:
        gbps, latency = ((cluster.inter_gbps, cluster.inter_latency_us) if pp_inter
                         else (cluster.intra_gbps, cluster.intra_latency_us))
        link_s += (pp - 1) * (latency * 1e-6 + activation / (gbps * GB))
    read_s = (sum(weights) + sum(kv) / 2) / (cluster.hbm_gbps * GB)  # KV at half the context
    step_s = read_s + link_s
    dp = cluster.gpus // (tp * pp)
    return Layout(tp, pp, dp, fits, round(weights[worst] / GB, 3), round(kv[worst] / GB, 3),
                  round(overhead / GB, 3), round(link_s * 1e3, 3), round(step_s * 1e3, 3),
                  round(dp * batch / step_s, 1) if dp else 0.0,
                  "inter-node" if tp_inter else "intra-node",
                  "" if pp == 1 else ("inter-node" if pp_inter else "intra-node"))


def rank_bytes(shape: Shape, tp: int, pp: int, stage: int, dtype_bytes: int,
               block_size: int = 16) -> dict[str, float]:
    """What one TP rank of `stage` holds and sends, as its worker's metrics count them:
    weights; KV bytes per block of block_size positions; and per token it processes the bytes
    it all-reduces (2 per layer, plus the embedding's on the first stage) and sends to the next
    stage (its slice of the residual stream), per token entering a later stage the slice it
    all-gathers, and per token sampled on the last stage its slice of the logits."""
    layers = stage_layers(shape.layers, pp)[stage]
    h, vocab_per_rank = shape.hidden, math.ceil(shape.vocab / tp)
    weights = layers * shape.layer_bytes_per_rank(tp, 1)
    if stage == 0:
        weights += vocab_per_rank * h
    if stage == pp - 1:
        weights += vocab_per_rank * h * (not shape.head_shared(pp)) + h
    parallel = tp > 1
    return {
        "weights": weights * dtype_bytes,
        "kv_per_block": block_size * layers * 2 * kv_heads_per_rank(shape.kv_heads, tp)
        * shape.head_dim * dtype_bytes,
        "all_reduce_per_token": (2 * layers + (stage == 0)) * h * dtype_bytes * parallel,
        "all_gather_per_token": (h // tp) * dtype_bytes * (parallel and stage > 0),
        "all_gather_per_sampled_token": vocab_per_rank * dtype_bytes * (parallel and stage == pp - 1),
        "stage_link_per_token": (h // tp) * dtype_bytes * (stage < pp - 1),
    }


def layouts(shape: Shape, cluster: Cluster, batch: int, context: int, dtype_bytes: int
            ) -> list[Layout]:
    """Every TP (dividing the heads, and the KV heads or a multiple of them) x PP (at most the
    layers) whose replica fits on the cluster's GPUs."""
    out = []
    for tp in (t for t in range(1, cluster.gpus + 1) if shape.heads % t == 0
               and (shape.kv_heads % t == 0 or t % shape.kv_heads == 0)):
        if tp <= cluster.gpus_per_node and cluster.gpus_per_node % tp:
            continue  # a node holds whole TP groups
        if tp > cluster.gpus_per_node and tp % cluster.gpus_per_node:
            continue  # or a TP group spans whole nodes
        for pp in range(1, min(shape.layers, cluster.gpus // tp) + 1):
            out.append(evaluate(shape, cluster, tp, pp, batch, context, dtype_bytes))
    return out


def recommend(found: list[Layout], objective: str) -> Layout | None:
    fitting = [x for x in found if x.fits and x.dp >= 1]
    if not fitting:
        return None
    if objective == "latency":
        return min(fitting, key=lambda x: (x.step_ms, x.tp * x.pp))
    return max(fitting, key=lambda x: (x.tokens_per_s, -x.tp * x.pp))


def reason(best: Layout, shape: Shape, cluster: Cluster, dtype_bytes: int, objective: str) -> str:
    weights_gb = shape.params() * dtype_bytes / GB
    need = math.ceil(weights_gb / cluster.gpu_memory_gb)
    where = "inside a node (NVLink)" if best.tp_link == "intra-node" else "across nodes"
    parts = [f"TP={best.tp} x PP={best.pp} x DP={best.dp}: {weights_gb:.0f} GB of weights need "
             f">= {need} GPU(s) of {cluster.gpu_memory_gb:g} GB"]
    if best.tp > 1:
        parts.append(f"TP's {2 * shape.layers} all-reduces per token stay {where}")
    if best.pp > 1:
        parts.append(f"PP ships the residual stream {best.pp - 1} time(s) per token "
                     f"({best.pp_link})")
    goal = "the most tokens/s" if objective == "throughput" else "the shortest step"
    return "; ".join(parts) + f"; {goal} of the layouts that fit ({best.step_ms:.1f} ms/step)."


def helm_values(best: Layout, model_path: str) -> str:
    """A values file of the chart for the layout (GPUs on; the model path when given)."""
    lines = ["# written by `meshserve plan`", f"replicas: {best.dp}", f"tp: {best.tp}",
             f"pp: {best.pp}", "gpu:", "  enabled: true"]
    if model_path:
        lines += ["model:", f"  path: {json.dumps(model_path)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshserve plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a checkpoint folder or its config.json")
    p.add_argument("--gpu", default="H100-SXM", choices=sorted(PRESETS["gpus"]))
    p.add_argument("--gpu-memory-gb", type=float, help="HBM per GPU (default: the --gpu's)")
    p.add_argument("--hbm-gbps", type=float, help="HBM bandwidth, GB/s (default: the --gpu's)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--intra-node", default="nvlink4", choices=sorted(PRESETS["links"]))
    p.add_argument("--inter-node", default="ib-400g", choices=sorted(PRESETS["links"]))
    p.add_argument("--intra-node-gbps", type=float)
    p.add_argument("--intra-node-latency-us", type=float)
    p.add_argument("--inter-node-gbps", type=float)
    p.add_argument("--inter-node-latency-us", type=float)
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (KV sizing)")
    p.add_argument("--batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--objective", default="throughput", choices=("throughput", "latency"))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--helm-values", default="", help="write the recommended layout's values here")
    a = p.parse_args(argv)
    path = Path(a.model)
    config = path / "config.json" if path.is_dir() else path
    try:
        shape = Shape.from_config(json.loads(config.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read a model config from {config}: {exc}", file=sys.stderr)
        return 2
    gpu, intra, inter = (PRESETS["gpus"][a.gpu], PRESETS["links"][a.intra_node],
                         PRESETS["links"][a.inter_node])
    cluster = Cluster(
        a.gpu_memory_gb or gpu["memory_gb"], a.hbm_gbps or gpu["hbm_gbps"], a.gpus_per_node,
        a.nodes, a.intra_node_gbps or intra["gbps"],
        a.intra_node_latency_us if a.intra_node_latency_us is not None else intra["latency_us"],
        a.inter_node_gbps or inter["gbps"],
        a.inter_node_latency_us if a.inter_node_latency_us is not None else inter["latency_us"])
    dtype_bytes = DTYPE_BYTES[a.dtype]
    found = layouts(shape, cluster, a.batch, a.context, dtype_bytes)
    best = recommend(found, a.objective)
    weights_gb = shape.params() * dtype_bytes / GB
    plan = {"model": str(config), "weights_gb": round(weights_gb, 3),
            "min_gpus_for_weights": math.ceil(weights_gb / cluster.gpu_memory_gb),
            "cluster": asdict(cluster), "batch": a.batch, "context": a.context,
            "layouts": [asdict(x) for x in found],
            "recommended": None if best is None else {"tp": best.tp, "pp": best.pp, "dp": best.dp},
            "reason": (reason(best, shape, cluster, dtype_bytes, a.objective) if best else
                       f"no layout fits {cluster.gpus} GPU(s) of {cluster.gpu_memory_gb:g} GB: "
                       "add GPUs or nodes, or lower --batch / --context")}
    if a.helm_values and best is not None:
        Path(a.helm_values).write_text(helm_values(best, str(path) if path.is_dir() else ""))
    if a.json:
        print(json.dumps(plan, indent=1))
    else:
        print(_table(plan))
    return 0 if best is not None else 1


def _table(plan: dict) -> str:
    rows = ["| TP | PP | DP | fits | weights GB/GPU | KV GB/GPU | link ms/token | step ms | "
            "tokens/s |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for x in plan["layouts"]:
        rows.append(f"| {x['tp']} | {x['pp']} | {x['dp']} | {'yes' if x['fits'] else 'no'} | "
                    f"{x['weights_gb_per_gpu']:.1f} | {x['kv_gb_per_gpu']:.1f} | "
                    f"{x['link_ms_per_token']:.2f} | {x['step_ms']:.2f} | "
                    f"{x['tokens_per_s']:.0f} |")
    return (f"{plan['weights_gb']:.1f} GB of weights, >= {plan['min_gpus_for_weights']} GPU(s)\n\n"
            + "\n".join(rows) + f"\n\nrecommended: {plan['recommended']}\n{plan['reason']}")


if __name__ == "__main__":
    sys.exit(main())

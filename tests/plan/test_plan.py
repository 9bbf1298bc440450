"""`meshserve plan` on the seed's examples (tests on its JSON), its flags and its values file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from deploy import plan

# Public architecture numbers of the two checkpoints (their config.json fields the plan reads).
LLAMA_3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
               "vocab_size": 128256}
LLAMA_3_405B = {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                "num_attention_heads": 128, "num_key_value_heads": 8, "head_dim": 128,
                "vocab_size": 128256}


def run_plan(tmp_path, config: dict, *flags: str) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "plan", "--model", str(path),
                          "--json", *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def layout(result: dict, tp: int, pp: int) -> dict:
    (found,) = [x for x in result["layouts"] if (x["tp"], x["pp"]) == (tp, pp)]
    return found


def test_llama_70b_needs_two_gpus_and_tp8_holds_17_5_gb_each(tmp_path):
    result = run_plan(tmp_path, LLAMA_3_70B, "--gpu-memory-gb", "80", "--batch", "1",
                      "--context", "1024")
    assert 140 <= result["weights_gb"] <= 142  # 70.6 B parameters at 2 bytes
    assert result["min_gpus_for_weights"] == 2
    assert not layout(result, 1, 1)["fits"]
    assert layout(result, 8, 1)["weights_gb_per_gpu"] == pytest.approx(17.5, abs=0.2)
    assert layout(result, 8, 1)["fits"] and layout(result, 4, 1)["fits"]
    # two GPUs hold the weights (70.6 GB each) but not the overhead within 90 % of 80 GB
    assert not layout(result, 2, 1)["fits"]
    for key in ("tp", "pp", "dp", "fits", "weights_gb_per_gpu", "kv_gb_per_gpu",
                "link_ms_per_token", "step_ms"):
        assert key in result["layouts"][0]
    assert result["reason"].startswith(f"TP={result['recommended']['tp']} x ")


def test_llama_405b_needs_11_gpus_and_takes_tp8_pp2_on_two_nodes(tmp_path):
    result = run_plan(tmp_path, LLAMA_3_405B, "--gpu", "H100-SXM", "--nodes", "2",
                      "--batch", "1", "--context", "1024")
    assert 805 <= result["weights_gb"] <= 820
    assert result["min_gpus_for_weights"] == 11
    assert result["recommended"] == {"tp": 8, "pp": 2, "dp": 1}
    tp16 = layout(result, 16, 1)  # TP across the nodes: its all-reduces cross the network
    assert tp16["tp_link"] == "inter-node"
    assert tp16["link_ms_per_token"] > layout(result, 8, 2)["link_ms_per_token"]
    assert "stay inside a node" in result["reason"] and "inter-node" in result["reason"]


def test_the_arithmetic_of_one_layout(tmp_path):
    """TP=8 x PP=2 of the 405B shape, by hand: 2 all-reduces per layer and the embedding's at
    100 us (NVLink preset), the logits' all-gather, one boundary over IB, the KV of 63 layers x
    1 KV head per rank."""
    result = run_plan(tmp_path, LLAMA_3_405B, "--nodes", "2", "--batch", "4", "--context",
                      "2048")
    x = layout(result, 8, 2)
    ring = 100e-6 + 2 * 7 / 8 * 4 * 16384 * 2 / 450e9
    gather = 100e-6 + 7 / 8 * 4 * 128256 * 2 / 450e9
    boundary = 200e-6 + 4 * 16384 * 2 / 50e9
    assert x["link_ms_per_token"] == pytest.approx((253 * ring + gather + boundary) * 1e3,
                                                   rel=1e-3)
    assert x["kv_gb_per_gpu"] == pytest.approx(4 * 2048 * 63 * 2 * 1 * 128 * 2 / 1e9, abs=1e-3)
    assert (x["tp_link"], x["pp_link"]) == ("intra-node", "inter-node")


def test_flags_override_the_presets_and_nothing_fits_says_what_to_do(tmp_path):
    slow = run_plan(tmp_path, LLAMA_3_70B, "--intra-node-gbps", "64",
                    "--intra-node-latency-us", "300")
    fast = run_plan(tmp_path, LLAMA_3_70B)
    assert layout(slow, 8, 1)["link_ms_per_token"] > layout(fast, 8, 1)["link_ms_per_token"]
    none = run_plan(tmp_path, LLAMA_3_405B, "--gpus-per-node", "4")
    assert none["recommended"] is None and "no layout fits 4 GPU(s)" in none["reason"]


def test_the_values_file_is_one_the_chart_takes(tmp_path):
    from tests.helm.chart import lint, render

    model = tmp_path / "Llama-3-70B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_3_70B))
    values_file = tmp_path / "values.yaml"
    assert plan.main(["--model", str(model), "--helm-values", str(values_file)]) == 0
    values = yaml.safe_load(values_file.read_text())
    result = run_plan(tmp_path, LLAMA_3_70B)
    assert {k: values[k] for k in ("tp", "pp", "replicas")} == {
        "tp": result["recommended"]["tp"], "pp": result["recommended"]["pp"],
        "replicas": result["recommended"]["dp"]}
    assert values["model"]["path"] == str(model)
    assert lint(values)["errors"] == []
    assert render(values).worker_sets()


def test_a_bad_model_path_is_an_error_a_user_can_act_on(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "plan", "--model",
                          str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot read a model config" in out.stderr

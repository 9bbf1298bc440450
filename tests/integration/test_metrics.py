"""Prometheus metrics of every service, scraped and parsed with prometheus_client's own parser:
they move by what the requests did, with vLLM's names under `meshserve:`."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import generate, replica_records, scrape, value

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 17, 18, 19], [1, 30, 31, 32, 33, 34], [1, 50, 51]]
NUM_TOKENS = 5
SERVICES = ("gateway", "replica-0-scheduler", "replica-0-worker-pp0-tp0")


def test_every_service_counts_what_the_requests_did(mesh, stub):
    urls = {name: mesh.metrics_url(name) for name in SERVICES}
    before = {name: scrape(url) for name, url in urls.items()}
    for prompt in PROMPTS:
        generate(stub, prompt_token_ids=prompt,
                 sampling=pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True))
    time.sleep(0.2)  # the scheduler's last step is counted once its outputs are delivered
    after = {name: scrape(url) for name, url in urls.items()}

    def moved(service: str, name: str, **labels) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    n, tokens = len(PROMPTS), len(PROMPTS) * NUM_TOKENS
    prompt_tokens = sum(len(p) for p in PROMPTS)
    # What the clients saw, at the gateway.
    assert moved("gateway", "meshserve:request_success_total", finished_reason="length") == n
    assert moved("gateway", "meshserve:time_to_first_token_seconds_count") == n
    assert moved("gateway", "meshserve:inter_token_latency_seconds_count") == tokens - n
    assert moved("gateway", "meshserve:e2e_request_latency_seconds_count") == n
    assert moved("gateway", "meshserve:request_generation_tokens_sum") == tokens
    assert moved("gateway", "meshserve:request_prompt_tokens_sum") == prompt_tokens
    assert moved("gateway", "meshserve:routing_decisions_total", reason="only") == n
    # What the replica did.
    scheduler = "replica-0-scheduler"
    assert moved(scheduler, "meshserve:generation_tokens_total") == tokens
    assert moved(scheduler, "meshserve:prompt_tokens_total") == prompt_tokens
    assert moved(scheduler, "meshserve:prefix_cache_queries_total") == prompt_tokens
    for phase in ("queue", "prefill", "decode", "inference"):
        assert moved(scheduler, f"meshserve:request_{phase}_time_seconds_count") == n
    steps = moved(scheduler, "meshserve:steps_total")
    assert steps >= NUM_TOKENS and moved(scheduler, "meshserve:step_time_seconds_count") == steps
    assert value(after[scheduler], "meshserve:kv_cache_usage_perc") == 0  # all blocks back
    assert value(after[scheduler], "meshserve:num_requests_running") == 0
    # And its worker ran those steps (eagerly: no CUDA graphs on a CPU).
    worker = "replica-0-worker-pp0-tp0"
    assert moved(worker, "meshserve:worker_steps_total", mode="eager") == steps
    assert moved(worker, "meshserve:worker_steps_total", mode="graph") == 0
    # What it holds: the tiny model's parameters, and its KV pool (float32 on a CPU).
    from services.model.config import ModelConfig
    from services.model.default_model import default_model_dir

    c = ModelConfig.from_dir(default_model_dir())
    h, d = c.hidden_size, c.head_dim
    layer = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * d \
        + c.num_attention_heads * d * h + 3 * h * c.intermediate_size + 2 * h
    params = c.num_hidden_layers * layer + c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h
    weights = value(after[worker], "meshserve:worker_memory_bytes", kind="weights")
    assert params * 4 <= weights <= (params + c.vocab_size * h) * 4  # a tied head may be a copy
    kv = value(after[worker], "meshserve:worker_memory_bytes", kind="kv_cache")
    per_block = 2 * c.num_hidden_layers * 16 * c.num_key_value_heads * d * 4
    assert kv > 0 and kv % per_block == 0
    # The OpenAI HTTP port serves the gateway's metrics too, without a key.
    http = scrape(mesh.http_url.removesuffix("/v1") + "/metrics")
    assert value(http, "meshserve:request_success_total") == value(
        after["gateway"], "meshserve:request_success_total")


def test_the_gateways_replica_gauges_are_the_registrys():
    """A request runs; once the heartbeat has told Redis, the gateway says the same. Heartbeats
    every 0.2 s and table refreshes every 0.1 s: the request (900 tokens of the tiny model, about
    a second) is still running when both have come round."""
    spec = MeshSpec(port=0, heartbeat_ttl_s=0.6, gateway_args=("--refresh-period", "0.1"),
                    worker_args=("--num-kv-blocks", "256"))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        _gauges_follow_the_registry(mesh, pb_grpc.GenerationStub(channel))


def _gauges_follow_the_registry(mesh, stub) -> None:
    running = stub.Generate(pb.GenerateRequest(prompt="long", sampling=pb.SamplingParams(
        max_tokens=900, ignore_eos=True)))
    next(running)
    try:
        # The gateway's own count, while the request is surely running.
        assert value(scrape(mesh.metrics_url("gateway")), "meshserve:replica_inflight_requests",
                     replica="replica-0") == 1
        deadline = time.monotonic() + 15
        while True:
            r = replica_records(mesh.redis_url)["replica-0"]
            gauges = scrape(mesh.metrics_url("gateway"))
            shown = {name: value(gauges, f"meshserve:replica_{name}", replica="replica-0")
                     for name in ("num_requests_running", "num_requests_waiting",
                                  "kv_cache_usage_perc")}
            expected = {"num_requests_running": r.num_running,
                        "num_requests_waiting": r.num_waiting,
                        "kv_cache_usage_perc": 1 - r.num_free_kv_blocks / r.num_kv_blocks}
            if r.num_running == 1 and shown == expected:
                break
            assert time.monotonic() < deadline, (shown, expected)
            time.sleep(0.1)
    finally:
        running.cancel()


def test_every_panel_of_the_grafana_dashboard_queries_an_exported_metric(mesh, stub):
    generate(stub, max_tokens=3, prompt="for the histograms")  # every family has samples
    exported = set()  # every series name the families make, samples or not yet
    for service in SERVICES:
        text = urllib.request.urlopen(mesh.metrics_url(service), timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            exported |= {family.name + s for s in suffixes.get(family.type, [""])}
    dashboard = json.loads((ROOT / "helm/meshserve/dashboards/meshserve.json").read_text())
    queried = {(panel["title"], name) for panel in dashboard["panels"]
               for target in panel["targets"]
               for name in re.findall(r"meshserve:[a-z0-9_]+", target["expr"])}
    assert len({title for title, _ in queried}) == len(dashboard["panels"])  # each has one
    assert [(title, name) for title, name in sorted(queried) if name not in exported] == []

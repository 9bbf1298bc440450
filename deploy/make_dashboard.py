"""Writes the chart's Grafana dashboard, helm/meshserve/dashboards/meshserve.json, from the
panel list below: `python deploy/make_dashboard.py` after changing it (the JSON is what ships,
and tests/integration/test_metrics.py checks that each panel queries an exported metric)."""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "helm" / "meshserve" / "dashboards" / "meshserve.json"

P = "meshserve:"


def q(quantile, metric, by="le"):
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({P}{metric}_bucket[$__rate_interval])))"


PANELS = [
    ("Requests running, per replica", [f"sum by (engine) ({P}num_requests_running)"], "short"),
    ("Requests waiting, per replica", [f"sum by (engine) ({P}num_requests_waiting)"], "short"),
    ("KV cache usage, per replica", [f"max by (engine) ({P}kv_cache_usage_perc)"], "percentunit"),
    ("Generation tokens/s, per replica",
     [f"sum by (engine) (rate({P}generation_tokens_total[$__rate_interval]))"], "short"),
    ("Prompt tokens/s, per replica",
     [f"sum by (engine) (rate({P}prompt_tokens_total[$__rate_interval]))"], "short"),
    ("Time to first token (p50, p99)",
     [q(0.5, "time_to_first_token_seconds"), q(0.99, "time_to_first_token_seconds")], "s"),
    ("Inter-token latency (p50, p99)",
     [q(0.5, "inter_token_latency_seconds"), q(0.99, "inter_token_latency_seconds")], "s"),
    ("End-to-end request latency (p50, p99)",
     [q(0.5, "e2e_request_latency_seconds"), q(0.99, "e2e_request_latency_seconds")], "s"),
    ("Queue time (p99), per replica",
     [q(0.99, "request_queue_time_seconds", "le, engine")], "s"),
    ("Finished requests/s, by reason",
     [f"sum by (finished_reason) (rate({P}request_success_total[$__rate_interval]))"], "reqps"),
    ("Failed requests/s, by code",
     [f"sum by (code) (rate({P}request_failures_total[$__rate_interval]))"], "reqps"),
    ("Prefix cache hit rate, per replica",
     [f"sum by (engine) (rate({P}prefix_cache_hits_total[$__rate_interval])) / "
      f"sum by (engine) (rate({P}prefix_cache_queries_total[$__rate_interval]))"],
     "percentunit"),
    ("Preemptions/s, per replica",
     [f"sum by (engine) (rate({P}num_preemptions_total[$__rate_interval]))"], "short"),
    ("Step time (p50, p99), per replica",
     [q(0.5, "step_time_seconds", "le, engine"), q(0.99, "step_time_seconds", "le, engine")],
     "s"),
    ("Sequences per step (mean), per replica",
     [f"sum by (engine) (rate({P}step_batch_size_sum[$__rate_interval])) / "
      f"sum by (engine) (rate({P}step_batch_size_count[$__rate_interval]))"], "short"),
    ("Routing decisions/s, by reason",
     [f"sum by (reason) (rate({P}routing_decisions_total[$__rate_interval]))"], "short"),
    ("Fail-overs/s",
     [f"sum by (recomputed) (rate({P}failovers_total[$__rate_interval]))"], "short"),
    ("Worker steps/s, CUDA graph vs eager",
     [f"sum by (mode) (rate({P}worker_steps_total[$__rate_interval]))"], "short"),
    ("TP collective bytes/s, by operation",
     [f"sum by (op) (rate({P}tp_collective_bytes_total[$__rate_interval]))"], "Bps"),
    ("Stage-link bytes/s sent, per stage",
     [f"sum by (pp_rank) (rate({P}stage_link_sent_bytes_total[$__rate_interval]))"], "Bps"),
]

panels = []
for i, (title, exprs, unit) in enumerate(PANELS):
    panels.append({
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(65 + j), "expr": e,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for j, e in enumerate(exprs)],
    })
dashboard = {
    "title": "meshserve", "uid": "meshserve", "schemaVersion": 39, "version": 1,
    "editable": True, "tags": ["meshserve", "llm"], "time": {"from": "now-1h", "to": "now"},
    "refresh": "10s",
    "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                             "label": "Prometheus"}]},
    "panels": panels,
}
OUT.write_text(json.dumps(dashboard, indent=2) + "\n")

"""Prometheus metrics of every service, named as vLLM names its own under the prefix
`meshserve:`, so a vLLM dashboard or autoscaler trigger works by changing only the prefix:
the same suffixes, units, meanings, labels (`model_name`, `engine`) and histogram buckets.

Where each lives (see docs/operations.md for the whole list):
- the gateway: what a client sees (time to first token, inter-token latency, end-to-end
  latency, request success by finish reason, tokens per request), routing decisions and
  fail-overs, and the per-replica figures it routes on, labelled by replica;
- each scheduler: its replica's queue and KV cache (running, waiting, KV use, prefix-cache
  queries and hits, preemptions, prompt and generation tokens) and each request's queue,
  prefill and decode times; per step, its batch size and time, and plans in flight;
- each worker: its steps, by CUDA-graph replay or eager, and their time.

Gauges and most counters are read from the service's own state when Prometheus scrapes (a
collector), so the step loop pays nothing for them; only histograms are observed as things
happen, once per step or per request, and per token only at the gateway.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "meshserve:"
disable_created_metrics()  # no *_created samples, as vLLM

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram_quantile over either reads alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# The mesh's own: a step is a millisecond or so on a GPU, tens on a CPU.
STEP_TIME_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's buckets of token counts."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """GET /metrics of the default registry on its own port (a thread); 0 = any free port.
    Returns the port."""
    server, _ = start_http_server(port, addr=host)
    return server.server_address[1]


def histogram(families: list, name: str, documentation: str, labels: dict[str, str], buckets):
    """A histogram of these labels' values, its family appended to families (which the
    service's collector yields): returns the child to observe."""
    family = Histogram(PREFIX + name, documentation, list(labels), buckets=buckets,
                       registry=None)
    families.append(family)
    return family.labels(*labels.values())


def gauge(name: str, documentation: str, labels: dict[str, str], value: float):
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def counter(name: str, documentation: str, labels: dict[str, str], value: float):
    family = CounterMetricFamily(PREFIX + name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def register_collector(collector) -> None:
    """Adds a collector (an object with collect()) to the default registry: one per service
    process (a second one with the same names is refused by prometheus_client)."""
    REGISTRY.register(collector)

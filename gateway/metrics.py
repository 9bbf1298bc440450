"""The gateway's Prometheus metrics: what its clients see, per request (vLLM's names under
`meshserve:`: time to first token, inter-token latency, end-to-end latency, success by finish
reason, tokens per request), how it routed and failed over, and the figures of every replica
it routes on, labelled by replica, so one scrape of a gateway shows the whole mesh.

Token counters (prompt_tokens, generation_tokens) are the schedulers': a sum over every
target then counts each token once."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from gateway.router import Router
from meshserve.v1 import generation_pb2 as pb
from services import metrics as m

FINISHED_REASON = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
                   pb.FINISH_REASON_EOS: "stop"}  # vLLM's finished_reason values


class RequestTimer:
    """One request's times and end, told synchronously by the stream that carries it (no
    generator of its own between the stream and its client)."""

    def __init__(self, metrics: GatewayMetrics):
        self.metrics, self.started, self.last, self.ended = metrics, time.monotonic(), 0.0, False

    def saw(self, response: pb.GenerateResponse) -> None:
        metrics = self.metrics
        if n := len(response.token_ids):
            now = time.monotonic()
            if not self.last:  # every token after the first has an inter-token latency
                metrics.ttft.observe(now - self.started)
                for _ in range(n - 1):
                    metrics.itl.observe(0.0)
            else:  # a message may carry several tokens: each gets its share
                for _ in range(n):
                    metrics.itl.observe((now - self.last) / n)
            self.last = now
        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.ended = True
            metrics.e2e.observe(time.monotonic() - self.started)
            metrics.success(response.finish_reason)
            metrics.prompt_tokens.observe(response.usage.prompt_tokens)
            metrics.generation_tokens.observe(response.usage.completion_tokens)

    def failed(self, code_name: str) -> None:
        self.ended = True
        self.metrics._failures.labels(self.metrics.model_name, code_name).inc()

    def closed(self) -> None:
        if not self.ended:  # the client left before the end
            self.metrics._success.labels(self.metrics.model_name, "abort").inc()


class GatewayMetrics:
    def __init__(self, router: Router, model_name: str, max_model_len: int):
        self.router = router
        self.model_name = model_name
        labels = {"model_name": model_name}
        self._families: list = []

        def metric(cls, name: str, documentation: str, extra=(), **kwargs):
            family = cls(m.PREFIX + name, documentation, [*labels, *extra], registry=None,
                         **kwargs)
            self._families.append(family)
            return family.labels(*labels.values()) if not extra else family

        self.ttft = metric(Histogram, "time_to_first_token_seconds",
                           "Histogram of time to first token in seconds.",
                           buckets=m.TTFT_BUCKETS)
        self.itl = metric(Histogram, "inter_token_latency_seconds",
                          "Histogram of inter-token latency in seconds.", buckets=m.ITL_BUCKETS)
        self.e2e = metric(Histogram, "e2e_request_latency_seconds",
                          "Histogram of e2e request latency in seconds.",
                          buckets=m.REQUEST_LATENCY_BUCKETS)
        token_buckets = m.build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = metric(Histogram, "request_prompt_tokens",
                                    "Number of prefill tokens processed.", buckets=token_buckets)
        self.generation_tokens = metric(Histogram, "request_generation_tokens",
                                        "Number of generation tokens processed.",
                                        buckets=token_buckets)
        self._success = metric(Counter, "request_success",
                               "Count of successfully processed requests.", ("finished_reason",))
        self._failures = metric(Counter, "request_failures",
                                "Requests that ended with an error status, by gRPC code.",
                                ("code",))
        self._routing = metric(Counter, "routing_decisions",
                               "Replica choices: by cached prefix, by load, past a share (balance), in turn, or the only one.",
                               ("reason",))
        self._failovers = metric(Counter, "failovers",
                                 "Requests resumed on another replica after one failed "
                                 "(recomputed: tokens had been streamed already).",
                                 ("recomputed",))
        self._redis_errors = metric(Counter, "redis_errors",
                                    "Redis calls that failed (the gateway went on without).",
                                    ("operation",))
        router.on_pick = lambda reason: self._routing.labels(model_name, reason).inc()
        router.on_redis_error = self.redis_error
        m.register_collector(self)

    def request(self) -> RequestTimer:
        """The timer of one request, told of each response as it leaves."""
        return RequestTimer(self)

    def success(self, finish_reason: int) -> None:
        self._success.labels(self.model_name, FINISHED_REASON.get(finish_reason, "abort")).inc()

    def failover(self, recomputed: bool) -> None:
        self._failovers.labels(self.model_name, str(recomputed).lower()).inc()

    def redis_error(self, operation: str) -> None:
        self._redis_errors.labels(self.model_name, operation).inc()

    def collect(self):
        for family in self._families:
            yield from family.collect()
        gauges = {
            "replica_num_requests_running": "Requests running on the replica (its heartbeat).",
            "replica_num_requests_waiting": "Requests waiting on the replica (its heartbeat).",
            "replica_kv_cache_usage_perc": "The replica's KV-cache usage, 1 = full.",
            "replica_draining": "1 while the replica drains (no new requests go there).",
            "replica_inflight_requests": "This gateway's requests on the replica now.",
        }
        families = {name: m.GaugeMetricFamily(m.PREFIX + name, doc,
                                              labels=["model_name", "replica"])
                    for name, doc in gauges.items()}
        for handle in list(self.router.replicas.values()):
            r = handle.record
            key = [r.model, r.replica_id]
            families["replica_num_requests_running"].add_metric(key, r.num_running)
            families["replica_num_requests_waiting"].add_metric(key, r.num_waiting)
            families["replica_kv_cache_usage_perc"].add_metric(
                key, 1.0 - r.num_free_kv_blocks / max(1, r.num_kv_blocks))
            families["replica_draining"].add_metric(key, float(r.draining))
            families["replica_inflight_requests"].add_metric(key, handle.num_inflight)
        yield from families.values()

"""A replica's Prometheus metrics (vLLM's names under `meshserve:`, labels model_name and
engine = the replica id): queue and KV figures read from the scheduler at scrape time, and
histograms observed once per step and once per finished request."""

from __future__ import annotations

import time

from prometheus_client import Histogram

from services import metrics as m
from services.scheduler.sequence import FinishReason, Sequence
from services.step import StepPlan, StepResult


class SchedulerMetrics:
    def __init__(self, engine, model_name: str, replica_id: str):
        self.engine = engine
        self.labels = {"model_name": model_name, "engine": replica_id}
        self._histograms: list[Histogram] = []  # collected with the gauges

        def histogram(name: str, documentation: str, buckets):
            return m.histogram(self._histograms, name, documentation, self.labels, buckets)

        latency = m.REQUEST_LATENCY_BUCKETS
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    latency)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.",
                                      latency)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.",
                                     latency)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        latency)
        self.iteration_tokens = histogram("iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          m.ITERATION_TOKENS_BUCKETS)
        self.step_batch_size = histogram("step_batch_size", "Sequences in each step.",
                                         m.BATCH_SIZE_BUCKETS)
        self.step_time = histogram("step_time_seconds",
                                   "Time of each step on its workers, launch to sampled ids.",
                                   m.STEP_TIME_BUCKETS)
        m.register_collector(self)

    # -- observed as things happen ---------------------------------------------------------

    def on_step(self, plan: StepPlan, result: StepResult) -> None:
        self.iteration_tokens.observe(plan.num_tokens)
        self.step_batch_size.observe(len(plan.seqs))
        if result.step_time_us:
            self.step_time.observe(result.step_time_us / 1e6)

    def on_finish(self, seq: Sequence) -> None:
        if seq.finish_reason is FinishReason.ERROR or not seq.scheduled_time:
            return  # failed with its replica, or never ran: nothing to time
        now = time.monotonic()
        self.queue_time.observe(seq.scheduled_time - seq.arrival_time)
        self.inference_time.observe(now - seq.scheduled_time)
        if seq.first_token_time:
            self.prefill_time.observe(seq.first_token_time - seq.scheduled_time)
            self.decode_time.observe(now - seq.first_token_time)

    # -- read at scrape time ----------------------------------------------------------------

    def collect(self):
        sched, labels = self.engine.scheduler, self.labels
        blocks = sched.blocks
        yield m.gauge("num_requests_running", "Number of requests in model execution batches.",
                      labels, len(sched.running))
        yield m.gauge("num_requests_waiting", "Number of requests waiting to be processed.",
                      labels, len(sched.waiting))
        yield m.gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                      labels, 1.0 - blocks.num_free_blocks / blocks.num_blocks)
        yield m.gauge("num_plans_in_flight", "Step plans sent to the workers, not yet back.",
                      labels, self.engine.num_inflight_plans)
        yield m.counter("prefix_cache_queries",
                        "Prefix cache queries, in terms of number of queried tokens.", labels,
                        sched.num_prefix_query_tokens)
        yield m.counter("prefix_cache_hits",
                        "Prefix cache hits, in terms of number of cached tokens.", labels,
                        sched.num_prefix_hit_tokens)
        yield m.counter("num_preemptions", "Cumulative number of preemption from the engine.",
                        labels, sched.num_preemptions)
        yield m.counter("prompt_tokens", "Number of prefill tokens processed.", labels,
                        sched.num_prompt_tokens)
        yield m.counter("generation_tokens", "Number of generation tokens processed.", labels,
                        sched.num_generation_tokens)
        yield m.counter("steps", "Steps the replica ran.", labels, self.engine.num_steps)
        for family in self._histograms:
            yield from family.collect()

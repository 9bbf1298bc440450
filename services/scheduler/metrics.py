"""A replica's Prometheus metrics (vLLM's names under `meshserve:`, labels model_name and
engine = the replica id): queue and KV figures read from the scheduler at scrape time, and
histograms observed once per step and once per finished request."""

from __future__ import annotations

import time

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily

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

        # vLLM's request phases: (its name in the metric, in the documentation)
        self.phase_time = {
            phase: histogram(f"request_{phase}_time_seconds",
                             f"Histogram of time spent in {doc} phase for request.",
                             m.REQUEST_LATENCY_BUCKETS)
            for phase, doc in (("queue", "WAITING"), ("prefill", "PREFILL"),
                               ("decode", "DECODE"), ("inference", "RUNNING"))}
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
        now, phase = time.monotonic(), self.phase_time
        phase["queue"].observe(seq.scheduled_time - seq.arrival_time)
        phase["inference"].observe(now - seq.scheduled_time)
        if seq.first_token_time:
            phase["prefill"].observe(seq.first_token_time - seq.scheduled_time)
            phase["decode"].observe(now - seq.first_token_time)

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
        if sched.config.speculative is not None:
            yield m.counter("spec_decode_num_drafts", "Number of spec decoding drafts.", labels,
                            sched.num_drafts)
            yield m.counter("spec_decode_num_draft_tokens", "Number of draft tokens.", labels,
                            sched.num_draft_tokens)
            yield m.counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                            labels, sched.num_accepted_tokens)
            per_pos = CounterMetricFamily(m.PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted tokens per draft position.",
                                          labels=[*labels, "position"])
            for position, count in enumerate(sched.num_accepted_per_pos):
                per_pos.add_metric([*labels.values(), str(position)], count)
            yield per_pos
        for family in self._histograms:
            yield from family.collect()

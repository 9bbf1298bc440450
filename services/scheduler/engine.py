"""The step loop of one replica: plan, send to every worker, apply results.

Up to `max_inflight_steps` plans travel at once, so the workers never wait on the scheduler:
with PP = 1 the next plan is already queued at the workers while they compute the current
one (decodes name "the token you just sampled"); with PP = P, P micro-batches of disjoint
sequences keep every stage busy. Results come back in plan order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.scheduler.scheduler import Scheduler, SeqUpdate
from services.scheduler.sequence import FinishReason, Sequence
from services.scheduler.workers import WorkerGroup, WorkerGroupError
from services.step import StepPlan

log = logging.getLogger(__name__)


@dataclass
class Output:
    """What a request's stream receives: new tokens, and the reason once it ended."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_cached_prompt_tokens: int = 0


class Engine:
    def __init__(self, scheduler: Scheduler, workers: WorkerGroup, max_inflight_steps: int):
        self.scheduler = scheduler
        self.workers = workers
        self.max_inflight_steps = max_inflight_steps
        self.num_steps = 0
        self._inflight: deque[StepPlan] = deque()
        self._sinks: dict[int, Callable[[Output], None]] = {}  # where each sequence's output goes
        self._wake = asyncio.Event()
        self.failure: Exception | None = None
        self.metrics = None  # a SchedulerMetrics, when the replica exports them

    @property
    def num_inflight_plans(self) -> int:
        return len(self._inflight)

    # -- requests ------------------------------------------------------------------------

    def submit(self, seq: Sequence, sink: Callable[[Output], None]) -> None:
        """Queues seq; sink receives its outputs (called on the event loop, never blocking),
        the last one with a finish reason."""
        if self.failure is not None:
            raise WorkerGroupError(f"replica is broken: {self.failure}")
        self._sinks[seq.seq_id] = sink
        self.scheduler.add(seq)
        self._wake.set()

    def cancel(self, seq_id: int) -> bool:
        self._sinks.pop(seq_id, None)
        seq = self.scheduler.abort(seq_id)
        self._wake.set()
        return seq is not None

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                self._fill_pipeline()
                if self._inflight:
                    await self._collect_one()
                else:
                    self._wake.clear()
                    if not self.scheduler.has_work:
                        await self.workers.wait(self._wake)
        except WorkerGroupError as exc:
            log.error("replica failed: %s", exc)
            self.failure = exc
            self._fail_everything()
            raise

    def _fill_pipeline(self) -> None:
        while len(self._inflight) < self.max_inflight_steps:
            plan = self.scheduler.schedule()
            if plan is None:
                return
            self._inflight.append(plan)
            self.workers.send(plan)

    async def _collect_one(self) -> None:
        result = await self.workers.next_result()
        plan = self._inflight.popleft()
        if result.step_id != plan.step_id:
            raise WorkerGroupError(f"result of step {result.step_id}, expected {plan.step_id}")
        self.num_steps += 1
        if self.metrics is not None:
            self.metrics.on_step(plan, result)
        updates = self.scheduler.on_result(plan, result.tokens_by_seq(),
                                           result.proposals_by_seq())
        # The next plan goes to the workers before the streams are woken with these tokens:
        # the event loop then writes it first, and the device does not wait for the streams.
        self._fill_pipeline()
        for update in updates:
            self._deliver(update)

    def _deliver(self, update: SeqUpdate) -> None:
        sink = self._sinks.get(update.seq.seq_id)
        if sink is None:
            return
        if update.finished is not None:
            self._sinks.pop(update.seq.seq_id, None)
            if self.metrics is not None:
                self.metrics.on_finish(update.seq)
        sink(Output(update.new_token_ids, update.finished, update.seq.num_cached_prompt_tokens))

    def _fail_everything(self) -> None:
        for seq in self.scheduler.fail_all():
            sink = self._sinks.pop(seq.seq_id, None)
            if sink is not None:
                sink(Output([], FinishReason.ERROR))

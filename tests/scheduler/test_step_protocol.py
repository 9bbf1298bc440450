"""The step contract under random traffic: the scheduler's plans, through the wire format,
applied by the worker's real InputBatch, with one to three steps in flight, arrivals, cancels, EOS,
shared prefixes and preemption. Every input the worker builds must be the sequence's token at
that position, and when the traffic ends every block is back in the pool.

A seeded simulation, not a timed test: each seed replays the same interleaving.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from services.scheduler.block_manager import BlockManager
from services.scheduler.scheduler import Scheduler, SchedulerConfig
from services.scheduler.sequence import RequestParams, Sequence
from services.step import SamplingOptions, StepPlan
from services.worker.input_batch import InputBatch

BLOCK_SIZE = 4
MAX_LIVE = 6
EOS = 2
PREFIXES = [[1] + [10] * 9, [1] + [30 + i for i in range(11)], [1]]


class Simulation:
    def __init__(self, seed: int, num_blocks: int, inflight: int):
        self.rng = random.Random(seed)
        self.sched = Scheduler(
            SchedulerConfig(max_num_seqs=5, max_num_batched_tokens=16, eos_token_ids=(EOS,),
                            max_live_seqs=MAX_LIVE),
            BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True))
        self.batch = InputBatch(MAX_LIVE, max_blocks_per_seq=16, block_size=BLOCK_SIZE,
                                device=torch.device("cpu"))
        self.inflight_limit = inflight
        self.inflight: deque = deque()  # (plan, its host inputs)
        self.all_seqs: dict[int, Sequence] = {}
        self.last_sampled: dict[int, int] = {}  # worker row -> the token it sampled last
        self.next_id = 1
        self.num_checked = 0

    def arrive(self) -> None:
        prompt = self.rng.choice(PREFIXES) + [self.rng.randrange(3, 60)
                                              for _ in range(self.rng.randrange(0, 12))]
        seq = Sequence(self.next_id, f"r{self.next_id}", prompt,
                       RequestParams(self.rng.randrange(1, 14), SamplingOptions(),
                                     ignore_eos=self.rng.random() < 0.5))
        self.all_seqs[seq.seq_id] = seq
        self.sched.add(seq)
        self.next_id += 1

    def cancel_one(self) -> None:
        live = [s for s in self.all_seqs.values() if not s.is_finished]
        if live:
            self.sched.abort(self.rng.choice(live).seq_id)

    def fill(self) -> None:
        while len(self.inflight) < self.inflight_limit:
            plan = self.sched.schedule()
            if plan is None:
                return
            plan = StepPlan.from_pb(plan.to_pb())  # what the worker receives
            self.inflight.append((plan, self.batch.prepare(plan)))

    def complete_one(self) -> None:
        plan, host = self.inflight.popleft()
        self._check_inputs(plan, host)
        sampled = {}
        for seq_id, row in zip(plan.sampled_seq_ids, host.sampled_rows.tolist()):
            token = EOS if self.rng.random() < 0.1 else self.rng.randrange(3, 60)
            self.last_sampled[row] = token
            sampled[seq_id] = [token]
        self.sched.on_result(plan, sampled)

    def _check_inputs(self, plan: StepPlan, host) -> None:
        """The step runs now: its inputs are the tokens the scheduler knows by now."""
        offset = 0
        for item, row in zip(plan.seqs, host.rows.tolist()):
            ids = host.input_ids[offset:offset + item.num_new_tokens].tolist()
            offset += item.num_new_tokens
            seq = self.all_seqs[item.seq_id]
            expected = seq.token_ids[item.num_computed_tokens:
                                     item.num_computed_tokens + item.num_new_tokens]
            resolved = [self.last_sampled[-t - 1] if t < 0 else t for t in ids]
            if seq.is_finished:  # cancelled meanwhile: its output stops early
                resolved = resolved[:len(expected)]
            assert resolved == expected, (item, ids)
            positions = host.positions[offset - item.num_new_tokens:offset].tolist()
            assert positions == list(range(item.num_computed_tokens,
                                           item.num_computed_tokens + item.num_new_tokens))
            assert row == self.batch.seqs[item.seq_id].row
            self.num_checked += 1

    def run(self, num_rounds: int) -> None:
        for _ in range(num_rounds):
            for _ in range(self.rng.choice([0, 0, 1, 2])):
                self.arrive()
            if self.rng.random() < 0.08:
                self.cancel_one()
            self.fill()
            if self.inflight:
                self.complete_one()
        for seq in list(self.all_seqs.values()):  # the traffic ends: everything drains
            self.sched.abort(seq.seq_id)
        while self.inflight or self.sched.has_work:
            self.fill()
            if self.inflight:
                self.complete_one()


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("num_blocks,inflight", [(64, 2), (64, 3), (14, 2), (14, 3), (14, 1)],
                         ids=["roomy", "roomy-3", "preempting", "preempting-3",
                              "preempting-no-overlap"])
def test_worker_inputs_are_the_tokens_and_blocks_come_back(seed, num_blocks, inflight):
    sim = Simulation(seed, num_blocks, inflight)
    sim.run(300)
    assert sim.num_checked > 100
    assert sim.sched.blocks.num_free_blocks == num_blocks
    assert not sim.sched.seqs and not sim.sched.running and not sim.sched.waiting
    assert (sim.sched.num_preemptions > 0) == (num_blocks == 14)  # the small pool preempts
    assert sim.sched.num_prefix_hit_tokens > 0  # the shared prefixes were found again

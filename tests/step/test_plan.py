"""The step contract on the wire: columns out, the same plan back."""

from __future__ import annotations

from meshserve.internal.v1 import worker_pb2 as pb
from services.step import SamplingOptions, ScheduledSeq, SeqStart, StepPlan, StepResult


def test_a_mixed_plan_survives_the_columns_exactly():
    options = SamplingOptions(0.75, 0.875, 40, seed=2**64 - 1)  # exact in float32
    start = SeqStart((1, 2, 3, 4, 5), options)
    plan = StepPlan(9, (
        ScheduledSeq(4, 120, 1, append_last_sampled=True, sample=True),
        ScheduledSeq(7, 0, 5, new_block_ids=(3, 8), start=start, sample=True),
        ScheduledSeq(2, 16, 2, new_block_ids=(11,), token_ids=(42, 43)),
        ScheduledSeq(5, 30, 1, token_ids=(9,), sample=True, draft_token_ids=(6, 6, 1)),
    ), micro_batch=1, finished_seq_ids=(3,), preempted_seq_ids=(6,), epoch=77)
    wire = pb.StepPlan.FromString(plan.to_pb().SerializeToString())
    assert StepPlan.from_pb(wire) == plan
    assert (list(wire.num_new_block_ids), list(wire.new_block_ids)) == ([0, 2, 1, 0], [3, 8, 11])
    assert [s.index for s in wire.starts] == [1]


def test_a_decode_plan_sends_no_ragged_columns():
    plan = StepPlan(1, tuple(ScheduledSeq(i, 300, 1, append_last_sampled=True, sample=True)
                             for i in range(64)))
    wire = plan.to_pb()
    assert not (wire.num_new_block_ids or wire.num_token_ids or wire.num_draft_token_ids
                or wire.starts)
    assert StepPlan.from_pb(wire) == plan


def test_result_ids_per_sequence():
    result = StepResult(3, (4, 7), (10, 11, 12), num_token_ids=(1, 2))
    assert StepResult.from_pb(result.to_pb()).tokens_by_seq() == {4: [10], 7: [11, 12]}
    assert StepResult(3, (4, 7), (10, 11)).tokens_by_seq() == {4: [10], 7: [11]}

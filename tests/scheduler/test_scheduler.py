"""The scheduling rule with exact plans: budgets, chunking, async decode, preemption, freeing."""

from __future__ import annotations

from services.scheduler.block_manager import BlockManager
from services.scheduler.scheduler import Scheduler, SchedulerConfig
from services.scheduler.sequence import FinishReason, RequestParams, Sequence
from services.step import SamplingOptions

GREEDY = SamplingOptions()


def make(num_blocks=16, block_size=4, **config) -> Scheduler:
    config.setdefault("eos_token_ids", (2,))
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size))


def seq(seq_id, prompt_len, max_tokens=4, first_token=100) -> Sequence:
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(seq_id, f"r{seq_id}", prompt, RequestParams(max_tokens, GREEDY))


def run(sched, plan, tokens):
    """Returns plan's sampled seqs the given tokens, in order."""
    ids = plan_sampled(plan)
    return sched.on_result(plan, {i: [t] for i, t in zip(ids, tokens)})


def plan_sampled(plan):
    return [s.seq_id for s in plan.seqs if s.sample]


def test_prefill_then_async_decode_uses_last_sampled_token():
    sched = make()
    sched.add(seq(1, 6))
    p0 = sched.schedule()
    (s,) = p0.seqs
    assert (s.start.token_ids, s.token_ids, s.num_computed_tokens, s.new_block_ids, s.sample) == (
        tuple(range(100, 106)), (), 0, (0, 1), True)
    # Planned before step 0 returns: the input is the token the worker just sampled.
    p1 = sched.schedule()
    (d,) = p1.seqs
    assert (d.start, d.token_ids, d.append_last_sampled, d.num_computed_tokens, d.new_block_ids) == (
        None, (), True, 6, ())
    # And again, before either returns (the engine bounds how many plans travel at once).
    p2 = sched.schedule()
    assert p2.seqs[0].num_computed_tokens == 7 and p2.seqs[0].append_last_sampled
    run(sched, p0, [7])
    assert sched.seqs[1].output_ids == [7]
    p3 = sched.schedule()
    assert p3.seqs[0].num_computed_tokens == 8 and p3.seqs[0].append_last_sampled


def test_no_async_decode_when_workers_do_not_keep_tokens():
    sched = make(workers_keep_last_token=False)
    sched.add(seq(1, 3))
    p0 = sched.schedule()
    assert sched.schedule() is None  # waits for its result (PP > 1)
    run(sched, p0, [9])
    p1 = sched.schedule()
    assert p1.seqs[0].token_ids == (9,) and not p1.seqs[0].append_last_sampled


def test_chunked_prefill_under_budget_while_others_decode():
    sched = make(max_num_batched_tokens=5)
    sched.add(seq(1, 2))
    p0 = sched.schedule()
    run(sched, p0, [7])
    sched.add(seq(2, 12, first_token=200))
    p1 = sched.schedule()
    assert [(s.seq_id, s.num_new_tokens, s.sample) for s in p1.seqs] == [
        (1, 1, True), (2, 4, False)]
    run(sched, p1, [8])
    p2 = sched.schedule()
    assert [(s.seq_id, s.num_computed_tokens, s.num_new_tokens) for s in p2.seqs] == [
        (1, 3, 1), (2, 4, 4)]


def test_unchunked_prefill_waits_for_a_step_with_room():
    sched = make(max_num_batched_tokens=5, enable_chunked_prefill=False)
    sched.add(seq(1, 2))
    run(sched, sched.schedule(), [7])
    sched.add(seq(2, 12, first_token=200))
    p = sched.schedule()
    assert [s.seq_id for s in p.seqs] == [1]  # the long prompt does not fit beside the decode


def test_finish_by_length_and_eos_frees_blocks_after_inflight_steps():
    sched = make()
    sched.add(seq(1, 4, max_tokens=2))
    sched.add(seq(2, 4, max_tokens=10, first_token=300))
    p0 = sched.schedule()
    p1 = sched.schedule()  # async decodes of both
    run(sched, p0, [7, 2])  # seq 2 samples EOS
    assert sched.seqs[2].finish_reason is FinishReason.EOS
    assert 2 in sched.seqs  # its decode in p1 is still in flight: blocks kept
    updates = run(sched, p1, [8, 9])
    assert [(u.seq.seq_id, u.new_token_ids, u.finished) for u in updates] == [
        (1, [8], FinishReason.LENGTH)]
    assert sched.seqs == {} and sched.blocks.num_free_blocks == 16
    nxt = sched.schedule()
    assert nxt is None
    sched.add(seq(3, 1))
    assert set(sched.schedule().finished_seq_ids) == {1, 2}


def test_abort_waiting_and_running():
    sched = make()
    sched.add(seq(1, 4))
    p0 = sched.schedule()
    sched.add(seq(2, 4))
    sched.abort(2)
    assert list(sched.waiting) == []
    sched.abort(1)
    assert sched.blocks.num_free_blocks < 16  # p0 in flight
    run(sched, p0, [5])
    assert sched.blocks.num_free_blocks == 16 and sched.seqs == {}


def test_preemption_by_recompute_keeps_outputs():
    # 4 blocks of 2 tokens: two 4-token prompts fill the pool; the first decode needs a 5th slot.
    sched = make(num_blocks=4, block_size=2, workers_keep_last_token=False)
    sched.add(seq(1, 4, max_tokens=4))
    sched.add(seq(2, 4, max_tokens=4, first_token=200))
    p0 = sched.schedule()
    assert [s.new_block_ids for s in p0.seqs] == [(0, 1), (2, 3)]
    run(sched, p0, [7, 8])
    p1 = sched.schedule()  # seq 1 needs a 3rd block: seq 2 (the newest) is preempted
    assert [s.seq_id for s in p1.seqs] == [1]
    assert p1.seqs[0].new_block_ids == (3,)  # seq 2's blocks were freed last-first
    assert sched.num_preemptions == 1
    assert [s.seq_id for s in sched.waiting] == [2]
    assert sched.seqs[2].num_computed_tokens == 0 and sched.seqs[2].output_ids == [8]
    assert (p1.preempted_seq_ids, p1.finished_seq_ids) == ((2,), ())
    run(sched, p1, [9])
    while 1 in sched.seqs:
        p = sched.schedule()
        assert [s.seq_id for s in p.seqs] == [1]
        run(sched, p, [10])
    # Seq 2 comes back: its prompt and its output so far are recomputed as one prefill.
    (s2,) = sched.schedule().seqs
    assert s2.seq_id == 2 and s2.sample
    # It starts again on the workers: every known token travels once more.
    assert (s2.start.token_ids[-1], len(s2.start.token_ids), s2.num_new_tokens) == (8, 5, 5)
    assert s2.new_block_ids == tuple(sched.blocks.block_table(2)) and len(s2.new_block_ids) == 3


def test_prefix_hit_reported_and_last_token_always_computed():
    sched = make(block_size=4)
    sched.add(seq(1, 8, max_tokens=1))
    p = sched.schedule()
    run(sched, p, [5])
    assert sched.seqs == {}
    sched.add(seq(2, 8, max_tokens=1))  # same 8 prompt tokens: 2 full cached blocks
    p = sched.schedule()
    (s,) = p.seqs
    # Block-aligned full hit: the last block is recomputed to get logits.
    assert (s.num_computed_tokens, s.num_new_tokens, s.start.token_ids) == (
        4, 4, tuple(range(100, 108)))
    assert sched.seqs[2].num_cached_prompt_tokens == 4


def test_a_block_ending_at_a_sample_in_flight_is_cached_once_its_token_is_known():
    """Prompt of 7 + a decode in flight when the prefill returns: block 1 (tokens 4..7) holds
    the token being sampled. It is cached after that token is known, with the right chain."""
    sched = make(block_size=4)
    sched.add(seq(1, 7, max_tokens=3))
    prefill = sched.schedule()
    decode = sched.schedule()  # planned before the prefill returned
    run(sched, prefill, [50])  # block 0 cached; block 1's last token was not known before now
    run(sched, decode, [51])
    sched.abort(1)
    assert sched.seqs == {}
    first = list(range(100, 107))
    sched.add(Sequence(2, "r2", first + [50], RequestParams(1, GREEDY)))  # its prompt + output
    (s,) = sched.schedule().seqs
    assert s.num_computed_tokens == 4  # a full hit, less the last block (recomputed for logits)
    sched.add(Sequence(3, "r3", first + [50, 51], RequestParams(1, GREEDY)))
    (s,) = sched.schedule().seqs
    assert s.num_computed_tokens == 8  # both blocks hit: the chain went on correctly


def test_micro_batches_are_disjoint_shares_of_the_sequences():
    sched = make(workers_keep_last_token=False, num_micro_batches=2)
    for i in range(4):
        sched.add(seq(i, 3, first_token=100 + 10 * i))
    first, second = sched.schedule(), sched.schedule()
    assert [s.seq_id for s in first.seqs] == [0, 1]
    assert [s.seq_id for s in second.seqs] == [2, 3]
    assert sched.schedule() is None  # every sequence is in flight
    run(sched, first, [5, 6])
    assert [s.seq_id for s in sched.schedule().seqs] == [0, 1]


def test_a_decode_plan_is_a_delta_whatever_the_context_length():
    sched = make(num_blocks=80, block_size=16, max_num_batched_tokens=1024)
    sched.add(seq(1, 1000, max_tokens=40))
    p0 = sched.schedule()
    assert len(p0.seqs[0].start.token_ids) == 1000 and len(p0.seqs[0].new_block_ids) == 63
    plans = [p0]
    for _ in range(30):  # async decodes: one plan queued behind the one in flight
        plans.append(sched.schedule())
        run(sched, plans[-2], [7])
    decodes = plans[1:]
    assert all(p.seqs[0].start is None and p.seqs[0].token_ids == () for p in decodes)
    assert all(p.seqs[0].append_last_sampled and p.seqs[0].num_new_tokens == 1 for p in decodes)
    # Positions 1008 and 1024 open a block: only those steps name one, and only the new one.
    grew = [(p.seqs[0].num_computed_tokens, p.seqs[0].new_block_ids) for p in decodes
            if p.seqs[0].new_block_ids]
    assert grew == [(1008, (63,)), (1024, (64,))]


def test_several_ids_per_sequence_stop_at_the_first_that_ends_it():
    sched = make()
    sched.add(seq(1, 3, max_tokens=10))
    p0 = sched.schedule()
    (update,) = sched.on_result(p0, {1: [5, 6, 2, 9]})  # 2 is EOS: 9 is dropped
    assert (update.new_token_ids, update.finished) == ([5, 6, 2], FinishReason.EOS)
    assert sched.seqs == {}


def test_no_more_live_sequences_than_the_workers_hold():
    sched = make(max_live_seqs=2)
    for i in range(3):
        sched.add(seq(i, 2, max_tokens=1, first_token=100 + 10 * i))
    p0 = sched.schedule()
    assert [s.seq_id for s in p0.seqs] == [0, 1] and [s.seq_id for s in sched.waiting] == [2]
    run(sched, p0, [5, 6])  # both end (max_tokens 1): their rows are free with the next plan
    p1 = sched.schedule()
    assert [s.seq_id for s in p1.seqs] == [2] and set(p1.finished_seq_ids) == {0, 1}

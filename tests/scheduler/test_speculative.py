"""n-gram speculative decoding, the scheduler's half: the settings, the proposals, and what a
verified step does to a sequence (its tokens, its computed KV, its blocks in the prefix cache)."""

from __future__ import annotations

import pytest

from services.scheduler.block_manager import BlockManager
from services.scheduler.scheduler import Scheduler, SchedulerConfig
from services.scheduler.sequence import RequestParams, Sequence
from services.scheduler.speculative import NgramIndex, SpeculativeConfig
from services.step import SamplingOptions

NGRAM = SpeculativeConfig("ngram", num_speculative_tokens=3, prompt_lookup_max=3,
                          prompt_lookup_min=1)


def test_the_config_is_vllms_json_and_refuses_what_it_cannot_do():
    assert SpeculativeConfig.parse("") is None
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, '
                                   '"prompt_lookup_max": 3}') == SpeculativeConfig("ngram", 4, 3, 1)
    assert SpeculativeConfig.parse('{"method": "draft_model", "model": "/m", '
                                   '"num_speculative_tokens": 3}') == SpeculativeConfig(
        "draft_model", 3, model="/m")
    for text, message in [
        ("{", "not JSON"),
        ('{"method": "ngram"}', "num_speculative_tokens is required"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "not one of"),
        ('{"method": "draft_model", "num_speculative_tokens": 2}', 'needs "model"'),
        ('{"method": "draft_model", "model": "x", "num_speculative_tokens": 2, '
         '"prompt_lookup_max": 2}', "unknown keys"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "integer >= 1"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": -1}',
         "integer >= 0"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}', "unknown keys"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
         '"prompt_lookup_max": 2}', "above prompt_lookup_max"),
    ]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.parse(text)


def test_ngram_proposes_what_followed_the_longest_earlier_suffix():
    index = NgramIndex(1, 3)
    tokens = [5, 6, 7, 8, 9, 5, 6, 7]
    assert index.propose(tokens, 3) == (8, 9, 5)  # "5 6 7" occurred before, then 8 9 5
    tokens += [1]
    assert index.propose(tokens, 3) == ()  # 1 never occurred before
    tokens += [5, 6]
    assert index.propose(tokens, 2) == (7, 1)  # the latest "5 6" came before 7, then 1
    assert index.propose(tokens, 0) == ()


def test_ngram_falls_back_to_shorter_suffixes_and_ignores_the_suffix_itself():
    index = NgramIndex(1, 4)
    assert index.propose([3], 4) == ()
    assert index.propose([3, 4, 3], 4) == (4, 3)  # only "3" matches: what followed it
    assert NgramIndex(2, 2).propose([3, 4, 9, 4], 2) == ()  # n = 2: "9 4" is new


def make(**config) -> Scheduler:
    config.setdefault("eos_token_ids", (2,))
    return Scheduler(SchedulerConfig(speculative=NGRAM, **config), BlockManager(32, 4))


def seq(seq_id, prompt, max_tokens=16, sampling=SamplingOptions()) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(prompt), RequestParams(max_tokens, sampling))


def test_a_verified_step_keeps_the_accepted_tokens_and_rolls_the_rest_back():
    sched = make()
    sched.add(seq(1, [10, 11, 12, 13, 10, 11]))
    prefill = sched.schedule()
    assert sched.schedule() is None  # a speculating sequence waits for its result
    sched.on_result(prefill, {1: [12]})  # now ... 10 11 12: "10 11 12" occurred, then 13 10 11
    step = sched.schedule()
    (s,) = step.seqs
    assert (s.num_computed_tokens, s.num_new_tokens, s.token_ids, s.draft_token_ids) == (
        6, 4, (12, 13, 10, 11), (13, 10, 11))
    assert not s.append_last_sampled and s.sample
    # The target agreed with 13 and 10, not with 11: it gets 13, 10 and the target's own 99.
    (update,) = sched.on_result(step, {1: [13, 10, 99]})
    the_seq = sched.seqs[1]
    assert update.new_token_ids == [13, 10, 99]
    assert the_seq.output_ids == [12, 13, 10, 99]
    # KV is computed for 12, 13, 10 (positions 6-8); 99 is the next step's input.
    assert the_seq.num_computed_tokens == 9
    assert (sched.num_drafts, sched.num_draft_tokens, sched.num_accepted_tokens) == (1, 3, 2)
    nxt = sched.schedule()
    assert nxt.seqs[0].num_computed_tokens == 9 and nxt.seqs[0].token_ids[0] == 99


def test_the_prefix_cache_holds_only_accepted_tokens():
    sched = make()
    sched.add(seq(1, [10, 11, 12, 10, 11]))  # block size 4
    sched.on_result(sched.schedule(), {1: [12]})
    step = sched.schedule()  # 12 + proposals 10 11 12 at positions 5-8
    assert step.seqs[0].draft_token_ids == (10, 11, 12)
    sched.on_result(step, {1: [77]})  # none accepted: positions 6-8 hold rejected KV
    assert sched.seqs[1].num_computed_tokens == 6
    # Only the first block (10 11 12 10) is full of computed KV; the second (11 12 77 .) is not.
    other = seq(2, [10, 11, 12, 10, 11, 12, 10, 11, 12])
    assert sched.blocks.allocate_prefix(2, other.token_ids, b"") == 4


def test_sampled_requests_and_max_tokens_limit_proposals():
    sched = make()
    sampled = SamplingOptions(temperature=0.8, seed=1)
    sched.add(seq(1, [10, 11, 10], sampling=sampled))
    sched.add(seq(2, [10, 11, 10], max_tokens=3))
    prefill = sched.schedule()
    sched.on_result(prefill, {1: [11], 2: [11]})
    step = sched.schedule()
    by_id = {s.seq_id: s for s in step.seqs}
    assert by_id[1].draft_token_ids == (10, 11)  # sampled requests propose as greedy ones do
    # Two tokens left to sample: this step samples one anyway, so one proposal at most.
    assert by_id[2].draft_token_ids == (10,)


def test_no_proposals_above_the_batch_size_that_disables_them():
    spec = SpeculativeConfig("ngram", 3, 3, 1, disable_by_batch_size=1)
    sched = Scheduler(SchedulerConfig(speculative=spec), BlockManager(32, 4))
    sched.add(seq(1, [10, 11, 10]))
    sched.on_result(sched.schedule(), {1: [11]})
    assert sched.schedule().seqs[0].draft_token_ids == (10, 11)  # alone: it speculates
    sched = Scheduler(SchedulerConfig(speculative=spec), BlockManager(32, 4))
    sched.add(seq(1, [10, 11, 10]))
    sched.add(seq(2, [10, 11, 10]))
    sched.on_result(sched.schedule(), {1: [11], 2: [11]})
    plain = sched.schedule()
    assert all(s.draft_token_ids == () for s in plain.seqs)  # two running: off
    assert sched.schedule() is not None  # and they plan ahead again, as without speculation


def test_a_sequence_verifying_proposals_waits_even_once_speculation_turns_off():
    spec = SpeculativeConfig("ngram", 3, 3, 1, disable_by_batch_size=1)
    sched = Scheduler(SchedulerConfig(speculative=spec), BlockManager(32, 4))
    sched.add(seq(1, [10, 11, 10]))
    sched.on_result(sched.schedule(), {1: [11]})
    verify = sched.schedule()
    assert verify.seqs[0].draft_token_ids == (10, 11)
    sched.add(seq(2, [5, 6]))  # a second sequence: speculation is off from now on
    step = sched.schedule()  # seq 2's prefill, but nothing for seq 1 until its result is back
    assert [s.seq_id for s in step.seqs] == [2]
    sched.on_result(verify, {1: [10, 99]})
    assert sched.seqs[1].output_ids == [11, 10, 99] and sched.seqs[1].num_computed_tokens == 5


def test_proposals_take_only_free_blocks():
    sched = Scheduler(SchedulerConfig(speculative=NGRAM), BlockManager(2, 4))  # 8 slots
    sched.add(seq(1, [10, 11, 12, 13, 10, 11]))
    sched.on_result(sched.schedule(), {1: [12]})  # 7 tokens: positions 0-6 in two blocks
    step = sched.schedule()  # 3 proposals would need positions 7-9: a third block
    assert step.seqs[0].draft_token_ids == () and step.seqs[0].num_new_tokens == 1


def test_a_draft_models_proposals_from_a_result_go_into_the_next_plan():
    config = SpeculativeConfig("draft_model", 3, model="/draft")
    sched = Scheduler(SchedulerConfig(speculative=config, eos_token_ids=(2,)), BlockManager(32, 4))
    sched.add(seq(1, [10, 11, 12]))
    prefill = sched.schedule()
    sched.on_result(prefill, {1: [13]}, {1: [14, 15, 16]})
    step = sched.schedule()
    assert step.seqs[0].draft_token_ids == (14, 15, 16)
    sched.on_result(step, {1: [14, 15, 99]}, {1: [7]})  # two kept, then the target's own 99
    assert sched.seqs[1].output_ids == [13, 14, 15, 99]
    assert (sched.num_draft_tokens, sched.num_accepted_tokens) == (3, 2)
    assert sched.schedule().seqs[0].draft_token_ids == (7,)

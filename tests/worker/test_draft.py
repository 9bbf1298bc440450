"""The draft model's proposer (services/worker/draft.py) on CPU: its proposals are the draft's
greedy continuation of what the sequence holds, however many of its last ones were kept."""

from __future__ import annotations

import pytest
import torch

from services.step import ScheduledSeq, SeqStart, SamplingOptions, StepPlan
from services.worker.draft import DraftProposer
from tests.model.paged import hf_greedy
from tests.worker.test_runner import BLOCK_SIZE, make_runner


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def test_proposals_are_the_drafts_greedy_continuation_after_every_kind_of_step(tiny_dir, hf_tiny):
    proposer = DraftProposer(make_runner(tiny_dir, 32), 32, BLOCK_SIZE, 3, 256)
    prompt = [1, 17, 29, 33, 41, 45]
    start = ScheduledSeq(7, 0, len(prompt), sample=True,
                         start=SeqStart(tuple(prompt), SamplingOptions()))
    flat, counts = proposer.propose(StepPlan(0, (start,)), {7: [100]})
    assert counts == [3] and flat == hf_greedy(hf_tiny, prompt + [100], 3)
    # A plain decode whose token is the first proposal: every token the step gave was proposed
    # (the draft must still feed the last one again).
    decode = ScheduledSeq(7, len(prompt), 1, append_last_sampled=True, sample=True)
    known = prompt + [100, flat[0]]
    flat, counts = proposer.propose(StepPlan(1, (decode,)), {7: [flat[0]]})
    assert flat == hf_greedy(hf_tiny, known, 3)
    # A verified step that kept one proposal, then gave a token of its own.
    verify = ScheduledSeq(7, len(known) - 1, 4, token_ids=(known[-1], *flat), sample=True,
                          draft_token_ids=tuple(flat))
    known += [flat[0], 5]
    flat, counts = proposer.propose(StepPlan(2, (verify,)), {7: [flat[0], 5]})
    assert flat == hf_greedy(hf_tiny, known, 3)
    # Dropped: its blocks go back to the pool.
    proposer.propose(StepPlan(3, (), finished_seq_ids=(7,)), {})
    assert proposer.seqs == {} and len(proposer._free) == 32

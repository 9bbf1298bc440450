"""The model runner driven by the real scheduler, in one process, against transformers.

Plans go through the wire format (to_pb / from_pb) as they do between processes, and two are in
flight at once: a decode is launched before the step that samples its input has been read back.
Small blocks, a small token budget and a small KV pool make block appends, chunked prefill and
preemption happen within a few steps. Both attention backends: plain torch, and the Triton
kernels (here in Triton's interpreter).
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

from services.model import ParallelContext, allocate_kv_caches, load_model
from services.scheduler.block_manager import BlockManager
from services.scheduler.scheduler import Scheduler, SchedulerConfig
from services.scheduler.sequence import RequestParams, Sequence
from services.scheduler.speculative import SpeculativeConfig
from services.step import SamplingOptions, StepPlan
from services.worker.runner import ModelRunner
from tests.model.paged import hf_greedy

BLOCK_SIZE = 4
PROMPTS = [[1, 17, 29, 33, 41, 45, 97, 101, 113], [1, 200, 201], [1, 7, 300, 301, 302, 303, 5]]


def make_runner(model_dir, num_blocks: int, backend: str = "torch",
                graph_sizes: tuple[int, ...] = (), verify_len: int = 1) -> ModelRunner:
    model = load_model(model_dir, ParallelContext(), dtype=torch.float32)
    caches = allocate_kv_caches(model.config, model.ctx, model.config.num_hidden_layers,
                                num_blocks + 1, BLOCK_SIZE, torch.float32, "cpu")
    runner = ModelRunner(model, caches, BLOCK_SIZE, torch.device("cpu"), model.ctx,
                         max_num_seqs=8, max_model_len=256, attention_backend=backend,
                         cuda_graph_sizes=graph_sizes, capture_graphs=False,
                         verify_len=verify_len)
    runner.capture_graphs()
    return runner


def serve(runner: ModelRunner, sched: Scheduler, seqs: list[Sequence]) -> dict[int, list[int]]:
    """Runs every sequence to its end, two plans in flight; returns the ids each received."""
    for seq in seqs:
        sched.add(seq)
    outputs = {seq.seq_id: [] for seq in seqs}
    inflight: deque = deque()
    while sched.has_work or inflight:
        while len(inflight) < 2 and (plan := sched.schedule()) is not None:
            plan = StepPlan.from_pb(plan.to_pb())
            inflight.append((plan, runner.launch(plan)))
        plan, pending = inflight.popleft()
        ids, counts = pending.results()  # counts: a verified sequence's accepted + 1
        sampled, at = {}, 0
        for seq_id, count in zip(pending.seq_ids, counts or [1] * len(pending.seq_ids)):
            sampled[seq_id], at = ids[at:at + count], at + count
        for update in sched.on_result(plan, sampled):
            outputs[update.seq.seq_id] += update.new_token_ids
    return outputs


def greedy_seqs(max_tokens: int) -> list[Sequence]:
    params = RequestParams(max_tokens, SamplingOptions(), ignore_eos=True)
    return [Sequence(i, f"r{i}", list(p), params) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_tokens_equal_transformers_through_chunks_and_preemption(tiny_dir, hf_tiny,
                                                                        backend):
    if backend == "triton":
        pytest.importorskip("triton")
    max_tokens = 12 if backend == "triton" else 24
    # 12 blocks of 4: the three sequences need 8 + 6 + 8 blocks at their ends, so the newest
    # is preempted and recomputed; an 8-token budget cuts the first prompt in two chunks.
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(12, BLOCK_SIZE))
    runner = make_runner(tiny_dir, 12, backend)
    outputs = serve(runner, sched, greedy_seqs(max_tokens))
    expected = {i: hf_greedy(hf_tiny, p, max_tokens) for i, p in enumerate(PROMPTS)}
    assert outputs == expected
    assert sched.num_preemptions >= 1
    # Workers drop a sequence with the plan after its end: only the last one is still held.
    assert len(runner.batch.seqs) == 1
    assert sched.blocks.num_free_blocks == 12


def test_the_graph_path_pads_buckets_with_scratch_rows_and_gives_the_same_tokens(tiny_dir,
                                                                                hf_tiny):
    """The decode-graph bodies (static buffers, padding rows in the scratch block and row,
    last sampled ids resolved on the device), run eagerly: 3 sequences pad to a bucket of 4."""
    pytest.importorskip("triton")
    sched = Scheduler(SchedulerConfig(), BlockManager(32, BLOCK_SIZE))
    runner = make_runner(tiny_dir, 32, "triton", graph_sizes=(1, 2, 4))
    outputs = serve(runner, sched, greedy_seqs(6))
    assert outputs == {i: hf_greedy(hf_tiny, p, 6) for i, p in enumerate(PROMPTS)}
    assert runner.graphs.num_replays >= 5  # every decode step went through a bucket


def test_the_graph_path_keeps_greedy_and_seeded_draws_of_one_batch_apart(tiny_dir):
    """The graph bodies write every row's greedy id as its last sampled id; a seeded row's draw
    must replace it. Greedy and seeded sequences sharing the batches give through the graph path
    the tokens they get without graphs."""
    pytest.importorskip("triton")
    seeded = RequestParams(8, SamplingOptions(temperature=0.9, top_k=50, seed=7), ignore_eos=True)
    greedy = RequestParams(8, SamplingOptions(), ignore_eos=True)

    def run(graph_sizes) -> tuple[dict[int, list[int]], ModelRunner]:
        sched = Scheduler(SchedulerConfig(), BlockManager(48, BLOCK_SIZE))
        seqs = [Sequence(i, f"r{i}", list(p), seeded if i == 1 else greedy)
                for i, p in enumerate(PROMPTS)]
        runner = make_runner(tiny_dir, 48, "triton", graph_sizes)
        return serve(runner, sched, seqs), runner

    without, _ = run(())
    with_graphs, runner = run((1, 2, 4))
    assert with_graphs == without
    assert runner.graphs.num_replays >= 5
    assert len(set(without[1])) > 2  # the seeded row drew, it did not take the argmax


def test_verification_steps_through_the_graph_path_give_the_tokens_of_eager_steps(tiny_dir,
                                                                                  hf_tiny):
    """n-gram speculation (K = 3) with the verification-graph bodies run eagerly: each window
    padded to K + 1 tokens, three sequences padded to a bucket of four. Greedy sequences give
    transformers' tokens, a seeded one the tokens it draws without graphs."""
    pytest.importorskip("triton")
    prompts = [[1, 40, 41, 42, 40, 41, 42, 40], [1, 7, 8, 7, 8, 7], [1, 300, 17, 250]]
    seeded = RequestParams(12, SamplingOptions(temperature=0.9, top_k=8, seed=3), ignore_eos=True)
    greedy = RequestParams(12, SamplingOptions(), ignore_eos=True)

    def run(graph_sizes) -> tuple[dict[int, list[int]], ModelRunner]:
        config = SchedulerConfig(speculative=SpeculativeConfig("ngram", 3, 3, 1))
        sched = Scheduler(config, BlockManager(48, BLOCK_SIZE))
        seqs = [Sequence(i, f"r{i}", list(p), seeded if i == 2 else greedy)
                for i, p in enumerate(prompts)]
        runner = make_runner(tiny_dir, 48, "triton", graph_sizes, verify_len=4)
        launch, runner.verifying_steps = runner.launch, 0

        def counting(plan, *args):
            runner.verifying_steps += any(s.draft_token_ids for s in plan.seqs)
            return launch(plan, *args)
        runner.launch = counting
        return serve(runner, sched, seqs), runner

    without, _ = run(())
    with_graphs, runner = run((1, 2, 4))
    assert with_graphs == without
    assert [with_graphs[i] for i in (0, 1)] == [hf_greedy(hf_tiny, p, 12) for p in prompts[:2]]
    # Every step with proposals replayed a verification graph, the others a decode one.
    assert runner.graphs.num_verify_replays == runner.verifying_steps >= 2
    assert runner.graphs.num_replays > runner.graphs.num_verify_replays


def test_verification_graphs_across_two_stages_give_the_tokens_of_one(tiny_dir):
    """PP = 2 in one process, stage 0 handing its residual stream to stage 1, both through the
    graph bodies with verification windows (stage 0 gathers its padded outputs back to the real
    tokens, stage 1 scatters them into its padded input): the tokens of one stage without graphs."""
    pytest.importorskip("triton")
    from services.model.parallel import stage_layer_range

    prompts = [[1, 40, 41, 42, 40, 41, 42, 40], [1, 7, 8, 7, 8, 7], [1, 300, 17, 250]]
    params = RequestParams(12, SamplingOptions(), ignore_eos=True)  # proposals from token 10 on
    config = SchedulerConfig(speculative=SpeculativeConfig("ngram", 3, 3, 1))

    def seqs():
        return [Sequence(i, f"r{i}", list(p), params) for i, p in enumerate(prompts)]

    expected = serve(make_runner(tiny_dir, 48, "triton"),
                     Scheduler(config, BlockManager(48, BLOCK_SIZE)), seqs())
    stages = []
    for rank in range(2):
        ctx = ParallelContext(pp_rank=rank, pp_size=2)
        model = load_model(tiny_dir, ctx, stage_layer_range(4, 2, rank), dtype=torch.float32)
        caches = allocate_kv_caches(model.config, ctx, 2, 49, BLOCK_SIZE, torch.float32, "cpu")
        runner = ModelRunner(model, caches, BLOCK_SIZE, torch.device("cpu"), ctx, max_num_seqs=8,
                             max_model_len=256, attention_backend="triton",
                             cuda_graph_sizes=(1, 2, 4), capture_graphs=False, verify_len=4)
        runner.capture_graphs()
        stages.append(runner)

    class TwoStages:  # what serve() drives: the plan through stage 0, then stage 1
        def launch(self, plan):
            return stages[1].launch(plan, stages[0].launch(plan).hidden)

    got = serve(TwoStages(), Scheduler(config, BlockManager(48, BLOCK_SIZE)), seqs())
    assert got == expected
    assert stages[0].graphs.num_verify_replays == stages[1].graphs.num_verify_replays >= 2


def test_a_seeded_draw_does_not_depend_on_what_shares_the_batch(tiny_dir):
    options = SamplingOptions(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    params = RequestParams(16, options, ignore_eos=True)

    def run(prompts) -> list[int]:
        sched = Scheduler(SchedulerConfig(), BlockManager(64, BLOCK_SIZE))
        seqs = [Sequence(i, f"r{i}", list(p), params) for i, p in enumerate(prompts)]
        return serve(make_runner(tiny_dir, 64), sched, seqs)[0]

    alone = run(PROMPTS[:1])
    assert run(PROMPTS) == alone
    assert len(set(alone)) > 3  # a real draw, not a constant


def test_a_plan_that_supplies_the_wrong_number_of_inputs_is_refused(tiny_dir):
    from services.step import ScheduledSeq, SeqStart

    runner = make_runner(tiny_dir, 8)
    bad = ScheduledSeq(0, 0, 5, (0, 1), start=SeqStart((1, 2, 3), SamplingOptions()),
                       sample=True)
    with pytest.raises(ValueError, match="supplies 3 input tokens for 5 new positions"):
        runner.launch(StepPlan(0, (bad,)))

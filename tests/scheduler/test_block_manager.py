"""BlockManager: exact block ids, refcounts, eviction order and prefix-index events."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.registry.block_hash import extra_key, prefix_block_hashes
from services.scheduler.block_manager import BlockManager

BS = 4
EK = extra_key("tiny-llama")


def toks(n, start=0):
    return list(range(start, start + n))


def hashes(tokens, ek=EK):
    return prefix_block_hashes(tokens, BS, ek)


def run_prompt(bm, seq, tokens, ek=EK):
    """Admit a prompt, compute all of it, cache its full blocks; returns the cached-token count."""
    num_cached = bm.allocate_prefix(seq, tokens, ek)
    assert bm.allocate(seq, len(tokens))
    bm.commit(seq, tokens, ek)
    return num_cached


def test_fresh_pool_allocates_in_order():
    bm = BlockManager(8, BS)
    assert bm.allocate("a", 10)
    assert bm.allocate("b", 4)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.block_table("b") == [3]
    assert bm.allocate("a", 12)  # still fits in 3 blocks
    assert bm.allocate("a", 13)
    assert bm.block_table("a") == [0, 1, 2, 4]
    assert [bm.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    assert bm.free_block_ids() == [5, 6, 7]
    assert bm.usage() == pytest.approx(5 / 8)


def test_free_returns_blocks_to_the_tail_last_block_first():
    bm = BlockManager(8, BS)
    bm.allocate("a", 12)
    bm.allocate("b", 8)
    bm.free("a")
    assert bm.free_block_ids() == [5, 6, 7, 2, 1, 0]
    bm.free("b")
    assert bm.free_block_ids() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert bm.block_table("a") == []
    bm.free("a")  # freeing twice is harmless
    assert bm.num_free_blocks == 8
    assert bm.allocate("c", 16)
    assert bm.block_table("c") == [5, 6, 7, 2]


def test_shared_prefix_between_two_running_sequences():
    bm = BlockManager(8, BS)
    prompt_a = toks(10)
    assert run_prompt(bm, "a", prompt_a) == 0
    h = hashes(prompt_a)
    assert bm.drain_events() == (h, [])
    assert [bm.block_hash(b) for b in range(3)] == [h[0], h[1], None]

    prompt_b = prompt_a[:8] + [99, 98]
    assert bm.allocate_prefix("b", prompt_b, EK) == 8
    assert bm.block_table("b") == [0, 1]
    assert bm.allocate("b", len(prompt_b))
    assert bm.block_table("b") == [0, 1, 3]
    assert [bm.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    bm.commit("b", prompt_b, EK)
    assert bm.num_cached_blocks() == 2
    assert bm.drain_events() == ([], [])

    bm.free("a")
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2]


def test_cached_freed_blocks_are_hit_and_taken_out_of_the_free_queue():
    bm = BlockManager(8, BS)
    prompt = toks(10)
    run_prompt(bm, "a", prompt)
    bm.drain_events()
    bm.free("a")
    assert bm.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.num_free_blocks == 8  # cached free blocks count as free
    assert bm.num_cached_blocks() == 2

    assert bm.allocate_prefix("b", prompt[:8] + [50, 51, 52], EK) == 8
    assert bm.block_table("b") == [0, 1]
    assert [bm.ref_count(b) for b in (0, 1)] == [1, 1]
    assert bm.free_block_ids() == [3, 4, 5, 6, 7, 2]
    assert bm.num_free_blocks == 6
    assert bm.allocate("b", 11)
    assert bm.block_table("b") == [0, 1, 3]
    assert bm.drain_events() == ([], [])


def test_eviction_takes_the_head_of_the_free_queue_and_reports_it():
    bm = BlockManager(4, BS)
    prompt_a = toks(13)
    run_prompt(bm, "a", prompt_a)  # blocks [0, 1, 2, 3], three full ones cached
    h = hashes(prompt_a)
    assert bm.drain_events() == (h, [])
    bm.free("a")
    assert bm.free_block_ids() == [3, 2, 1, 0]

    assert bm.allocate_prefix("b", toks(8, start=500), EK) == 0
    assert bm.allocate("b", 8)
    assert bm.block_table("b") == [3, 2]  # 3 was never cached; 2 held a's last full block
    assert bm.block_hash(2) is None
    assert bm.num_cached_blocks() == 2
    assert bm.drain_events() == ([], [h[2]])

    # The head of a's prefix survived: a resumed a hits it.
    assert bm.allocate_prefix("a", prompt_a, EK) == 8
    assert bm.block_table("a") == [0, 1]
    assert bm.num_free_blocks == 0
    assert not bm.allocate("a", 13)


def test_fully_cached_block_aligned_prompt_still_computes_its_last_token():
    bm = BlockManager(8, BS)
    prompt = toks(8)
    run_prompt(bm, "a", prompt)
    h = hashes(prompt)
    bm.free("a")
    bm.drain_events()
    assert bm.free_block_ids() == [2, 3, 4, 5, 6, 7, 1, 0]

    assert bm.allocate_prefix("b", prompt, EK) == 4  # not 8: token 7 needs its logits
    assert bm.block_table("b") == [0]
    assert bm.allocate("b", 8)
    assert bm.block_table("b") == [0, 2]
    bm.commit("b", prompt, EK)
    # h[1] stays with block 1 (free, cached); b's copy in block 2 is not cached.
    assert bm.block_hash(1) == h[1]
    assert bm.block_hash(2) is None
    assert bm.drain_events() == ([], [])

    assert bm.allocate_prefix("c", prompt + [8], EK) == 8
    assert bm.block_table("c") == [0, 1]
    assert [bm.ref_count(b) for b in range(3)] == [2, 1, 1]


def test_same_prefix_committed_by_two_sequences_in_one_step():
    bm = BlockManager(8, BS)
    prompt = toks(10)
    assert bm.allocate_prefix("a", prompt, EK) == 0
    assert bm.allocate_prefix("b", prompt, EK) == 0
    assert bm.allocate("a", 10) and bm.allocate("b", 10)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.block_table("b") == [3, 4, 5]
    bm.commit("a", prompt, EK)
    bm.commit("b", prompt, EK)
    h = hashes(prompt)
    assert [bm.block_hash(b) for b in range(6)] == [h[0], h[1], None, None, None, None]
    assert bm.num_cached_blocks() == 2
    assert bm.drain_events() == (h, [])

    # b's chain goes on past its uncached blocks: its third block is new and gets cached.
    longer = prompt + [10, 11, 12]
    assert bm.allocate("b", 13)
    bm.commit("b", longer, EK)
    h_longer = hashes(longer)
    assert bm.block_hash(5) == h_longer[2]
    assert bm.drain_events() == ([h_longer[2]], [])

    bm.free("b")  # 3 and 4 go back uncached; reusing them later reports nothing
    assert bm.free_block_ids() == [7, 6, 5, 4, 3]
    assert bm.allocate("c", 20)
    assert bm.block_table("c") == [7, 6, 5, 4, 3]
    assert bm.drain_events() == ([], [h_longer[2]])


def test_allocate_fails_atomically():
    bm = BlockManager(4, BS)
    run_prompt(bm, "a", toks(5))  # blocks [0, 1], block 0 cached
    bm.free("a")
    assert bm.allocate("b", 8)  # takes 2, 3
    assert bm.free_block_ids() == [1, 0]
    assert bm.can_allocate("c", 8)
    assert not bm.can_allocate("c", 9)
    assert not bm.allocate("c", 9)
    assert bm.block_table("c") == []
    assert not bm.allocate("b", 17)  # needs three more
    assert bm.block_table("b") == [2, 3]
    assert bm.free_block_ids() == [1, 0]
    assert bm.block_hash(0) == hashes(toks(5))[0]  # nothing evicted by the failed calls
    assert bm.drain_events() == (hashes(toks(5)), [])
    assert bm.allocate("b", 16)
    assert bm.block_table("b") == [2, 3, 1, 0]


def test_commit_caches_only_blocks_that_are_full_and_allocated():
    bm = BlockManager(8, BS)
    tokens = toks(12)
    assert bm.allocate("a", 6)
    bm.commit("a", tokens[:3], EK)
    assert bm.num_cached_blocks() == 0
    bm.commit("a", tokens[:6], EK)
    assert [bm.block_hash(b) for b in (0, 1)] == [hashes(tokens)[0], None]
    bm.commit("a", tokens, EK)  # 12 tokens known, but only two blocks held
    assert bm.block_hash(1) == hashes(tokens)[1]
    assert bm.num_cached_blocks() == 2
    assert bm.allocate("a", 12)
    bm.commit("a", tokens, EK)
    assert bm.block_hash(2) == hashes(tokens)[2]
    assert bm.drain_events() == (hashes(tokens), [])


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = toks(10)
    assert run_prompt(bm, "a", prompt) == 0
    assert bm.num_cached_blocks() == 0
    bm.free("a")
    assert run_prompt(bm, "b", prompt) == 0
    assert bm.block_table("b") == [3, 4, 5]
    assert bm.drain_events() == ([], [])


@pytest.mark.parametrize(
    "other_key",
    [extra_key("tiny-llama", "user-7"), extra_key("other-model")],
    ids=["cache_salt", "model"],
)
def test_extra_key_prevents_sharing(other_key):
    bm = BlockManager(8, BS)
    prompt = toks(10)
    run_prompt(bm, "a", prompt)
    assert bm.allocate_prefix("b", prompt, other_key) == 0
    assert bm.allocate_prefix("c", prompt, EK) == 8


def test_events_that_undo_each_other_within_a_drain_cancel():
    bm = BlockManager(2, BS)
    prompt = toks(5)
    run_prompt(bm, "a", prompt)  # caches h0 in block 0
    bm.free("a")
    assert bm.allocate("b", 8)  # evicts h0 before anyone drained
    assert bm.drain_events() == ([], [])

    bm.free("b")
    run_prompt(bm, "c", prompt)
    h0 = hashes(prompt)[0]
    assert bm.drain_events() == ([h0], [])
    bm.free("c")
    assert bm.free_block_ids() == [1, 0]
    assert bm.allocate("d", 8)  # evicts h0 ...
    bm.free("d")
    run_prompt(bm, "e", prompt)  # ... and caches it again: the index needs no change
    assert bm.drain_events() == ([], [])


def test_allocate_prefix_refuses_a_sequence_that_holds_blocks():
    bm = BlockManager(8, BS)
    bm.allocate("a", 4)
    with pytest.raises(ValueError):
        bm.allocate_prefix("a", toks(8), EK)


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    prompt = toks(10)
    run_prompt(bm, "a", prompt)
    bm.drain_events()
    assert not bm.reset_prefix_cache()
    bm.free("a")
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks() == 0
    assert bm.drain_events() == ([], hashes(prompt))
    assert bm.allocate_prefix("b", prompt, EK) == 0


# ---- property test: random admissions, steps, decodes and frees keep the invariants


SALTS = [extra_key("m", ""), extra_key("m", "s")]
BASES = [[7] * 40, toks(40), toks(40, start=1), [1, 2, 3, 4] * 10]
PBS = 2  # small blocks so that few tokens make many blocks


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives a BlockManager like a scheduler does and models the KV each block holds.

    The KV model is the point: a prefix hit must hand out blocks whose contents are exactly the
    prompt's tokens under the same extra key, and a sequence may write only into blocks it alone
    holds.
    """

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(10, PBS)
        self.seqs = {}  # seq id -> [tokens, num_computed, salt index]
        self.kv = {}  # block id -> {slot: (salt index, token)}
        self.index = set()  # the Redis prefix index, rebuilt from drained events
        self.next_id = 0

    @rule(base=st.integers(0, len(BASES) - 1), length=st.integers(1, 30), salt=st.integers(0, 1))
    def admit(self, base, length, salt):
        seq, prompt = self.next_id, BASES[base][:length]
        self.next_id += 1
        num_cached = self.bm.allocate_prefix(seq, prompt, SALTS[salt])
        assert num_cached % PBS == 0 and num_cached < len(prompt)
        table = self.bm.block_table(seq)
        assert len(table) == num_cached // PBS
        for pos in range(num_cached):
            assert self.kv[table[pos // PBS]][pos % PBS] == (salt, prompt[pos])
        if self.bm.allocate(seq, len(prompt)):
            self.seqs[seq] = [list(prompt), num_cached, salt]
        else:
            self.bm.free(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), chunk=st.integers(1, 9))
    def compute(self, data, chunk):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, done, salt = self.seqs[seq]
        table = self.bm.block_table(seq)
        end = min(len(tokens), done + chunk)
        for pos in range(done, end):
            block = table[pos // PBS]
            assert self.bm.ref_count(block) == 1, "writing into a shared block"
            assert self.bm.block_hash(block) is None, "writing into a cached block"
            if pos % PBS == 0:
                self.kv[block] = {}  # a block's first write: whatever it held before is gone
            self.kv[block][pos % PBS] = (salt, tokens[pos])
        self.seqs[seq][1] = end
        self.bm.commit(seq, tokens[:end], SALTS[salt])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 3))
    def decode(self, data, token):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, done, _ = self.seqs[seq]
        if done < len(tokens):
            return
        if self.bm.allocate(seq, len(tokens) + 1):
            tokens.append(token)
        else:
            self.preempt_or_finish(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        self.preempt_or_finish(data.draw(st.sampled_from(sorted(self.seqs))))

    def preempt_or_finish(self, seq):
        self.bm.free(seq)
        del self.seqs[seq]

    @rule()
    def drain(self):
        cached, evicted = self.bm.drain_events()
        assert len(set(cached)) == len(cached) and len(set(evicted)) == len(evicted)
        assert not self.index & set(cached)
        assert set(evicted) <= self.index
        self.index = (self.index - set(evicted)) | set(cached)
        assert self.index == self.cached_hashes()

    def cached_hashes(self):
        found = [self.bm.block_hash(b) for b in range(self.bm.num_blocks)]
        return {h for h in found if h is not None}

    @invariant()
    def refcounts_match_tables(self):
        counts = [0] * self.bm.num_blocks
        for seq in self.seqs:
            for block in self.bm.block_table(seq):
                counts[block] += 1
        assert [self.bm.ref_count(b) for b in range(self.bm.num_blocks)] == counts
        free = self.bm.free_block_ids()
        assert len(free) == len(set(free)) == self.bm.num_free_blocks
        assert set(free) == {b for b, c in enumerate(counts) if c == 0}
        assert self.bm.num_free_blocks + sum(c > 0 for c in counts) == self.bm.num_blocks

    @invariant()
    def cache_is_one_to_one_and_correct(self):
        found = [self.bm.block_hash(b) for b in range(self.bm.num_blocks)]
        cached = [(b, h) for b, h in enumerate(found) if h is not None]
        assert len({h for _, h in cached}) == len(cached) == self.bm.num_cached_blocks()
        for seq, (tokens, done, salt) in self.seqs.items():
            expected = prefix_block_hashes(tokens[:done], PBS, SALTS[salt])
            for i, block in enumerate(self.bm.block_table(seq)[: len(expected)]):
                assert found[block] in (expected[i], None)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_block_manager_invariants = BlockManagerMachine.TestCase

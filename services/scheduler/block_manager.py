"""Paged KV blocks with a prefix cache: plain Python, no tensors.

A sequence's KV lives in fixed-size blocks; its block table maps block index -> block id.
Blocks are shared between sequences by reference count, and a full block whose KV has been
computed is registered under the chained hash of its prefix (``services.registry.block_hash``)
so that a later prompt with the same prefix reuses it instead of computing it again::

    block_size = 4, num_blocks = 8

    seq A  tokens a0..a9    table [0, 1, 2]        blocks 0, 1 full and hashed, 2 partial
    seq B  tokens a0..a7 b8 table [0, 1, 3]        shares A's first two blocks
    (an earlier seq left block 4 full and cached when it was freed)

    block id    0    1    2    3    4    5    6    7
    refcount    2    2    1    1    0    0    0    0
    hash        h0   h1   -    -    h4   -    -    -       h0 = H(None, a0..a3), h1 = H(h0, a4..a7)

    free queue (LRU)   head -> 5 <-> 6 <-> 7 <-> 4 <- tail
                       allocate pops the head (evicting its hash, if any); free appends to the tail

Invariants (``free_block_ids`` and ``ref_count`` make them checkable):

* a block is in the free queue  <=>  its refcount is 0; ``num_free_blocks`` is its length, and
  ``num_free_blocks + blocks with refcount > 0 == num_blocks``;
* a block's refcount is the number of block tables that hold it;
* ``hash -> block`` and ``block -> hash`` are inverse maps; at most one block per hash. A cached
  block stays cached while free (block 4 above, a later prompt may still hit it) and loses its
  hash only when the free queue hands it out again: that is an eviction;
* freeing a sequence puts its blocks on the tail last block first, so the head of a prefix, the
  part most likely to be shared, is evicted last;
* a block is cached only once every token of it is computed (``commit``), never in place of an
  existing block with the same hash: two sequences that computed the same prefix in one step keep
  their own blocks, and only the first is cached.

Events (hashes cached, hashes evicted) are collected for the Redis prefix index and handed out by
``drain_events`` off the per-token path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from services.registry.block_hash import chain_block_hashes


@dataclass
class _HashState:
    """How far a sequence's blocks are hashed: blocks [0, num_hashed) and the last hash."""

    num_hashed: int = 0
    last_hash: int | None = None


class _EventLog:
    """Net changes to the set of cached hashes since the last drain.

    A hash alternates between cached and not cached, so a change that undoes a pending one
    cancels it: cached-then-evicted (or evicted-then-cached again) within a period reports nothing.
    """

    def __init__(self) -> None:
        self._cached: dict[int, None] = {}  # insertion-ordered sets
        self._evicted: dict[int, None] = {}

    def cached(self, block_hash: int) -> None:
        if block_hash in self._evicted:
            del self._evicted[block_hash]
        else:
            self._cached[block_hash] = None

    def evicted(self, block_hash: int) -> None:
        if block_hash in self._cached:
            del self._cached[block_hash]
        else:
            self._evicted[block_hash] = None

    def drain(self) -> tuple[list[int], list[int]]:
        out = (list(self._cached), list(self._evicted))
        self._cached.clear()
        self._evicted.clear()
        return out


class BlockManager:
    """Block tables, reference counts, the LRU free queue and the hash -> block prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head first
        self._tables: dict[Hashable, list[int]] = {}
        self._hash_states: dict[Hashable, _HashState] = {}
        self._events = _EventLog()

    # ---- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks with refcount 0, cached or not: all of them can be handed out."""
        return len(self._free)

    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def cached_hashes(self) -> list[int]:
        """Every hash the prefix cache holds now (to republish a lost Redis index)."""
        return list(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by some sequence."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables.get(seq_id, ()))

    def blocks_from(self, seq_id: Hashable, start: int) -> list[int]:
        """block_table(seq_id)[start:], without copying the blocks before start."""
        return self._tables.get(seq_id, [])[start:]

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash a block is cached under, or None."""
        return self._block_hashes[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue, head (next handed out) first."""
        return list(self._free)

    def num_blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """New blocks the sequence needs to hold token positions [0, num_tokens)."""
        num_held = len(self._tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - num_held)

    # ---- sequence life cycle

    def allocate_prefix(self, seq_id: Hashable, token_ids: Sequence[int], extra_key: bytes) -> int:
        """Start a sequence's table with the longest cached prefix of ``token_ids``.

        Takes a reference on each matched block and returns the number of tokens they cover.
        The match leaves at least the last token to compute, since its logits are needed: a
        fully cached, block-aligned prompt matches one block fewer.
        """
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id!r} already holds blocks; free it first")
        table = self._tables.setdefault(seq_id, [])
        state = self._hash_states.setdefault(seq_id, _HashState())
        if not self.enable_prefix_caching or not token_ids:
            return 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = chain_block_hashes(None, token_ids[: max_blocks * self.block_size], self.block_size, extra_key)
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            self._take_ref(block_id)
            table.append(block_id)
            state.last_hash = block_hash
        state.num_hashed = len(table)
        return len(table) * self.block_size

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow the table to cover positions [0, num_tokens); False, changing nothing, if short."""
        table = self._tables.get(seq_id)
        num_new = -(-num_tokens // self.block_size) - (len(table) if table is not None else 0)
        if num_new <= 0 and table is not None:  # most decode steps: the last block has room
            return True
        if num_new > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        self._hash_states.setdefault(seq_id, _HashState())
        for _ in range(num_new):
            table.append(self._pop_free())
        return True

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], extra_key: bytes) -> None:
        """Cache every block of the sequence that ``token_ids`` fills and that is not yet hashed.

        ``token_ids`` are the sequence's tokens whose KV is written (after the step that computed
        them): a block is cached only when all of its tokens are. A hash already held by another
        block stays with that block, and this one stays uncached.
        """
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        state = self._hash_states[seq_id]
        num_full = min(len(token_ids) // self.block_size, len(table))
        if num_full <= state.num_hashed:
            return
        start = state.num_hashed * self.block_size
        new_tokens = token_ids[start : num_full * self.block_size]
        hashes = chain_block_hashes(state.last_hash, new_tokens, self.block_size, extra_key)
        for block_id, block_hash in zip(table[state.num_hashed : num_full], hashes):
            if block_hash not in self._cached and self._block_hashes[block_id] is None:
                self._cached[block_hash] = block_id
                self._block_hashes[block_id] = block_hash
                self._events.cached(block_hash)
        if hashes:  # a chain that skipped a block would give every later block a wrong hash
            state.num_hashed += len(hashes)
            state.last_hash = hashes[-1]

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references; its unreferenced blocks join the tail, last block first.

        Freeing an unknown (or already freed) sequence does nothing.
        """
        self._hash_states.pop(seq_id, None)
        for block_id in reversed(self._tables.pop(seq_id, ())):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    # ---- prefix cache upkeep

    def drain_events(self) -> tuple[list[int], list[int]]:
        """(hashes newly cached, hashes evicted) since the last drain, net of each other."""
        return self._events.drain()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (as evictions); refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block_hash, block_id in self._cached.items():
            self._block_hashes[block_id] = None
            self._events.evicted(block_hash)
        self._cached.clear()  # every table is empty, so no sequence has hashed blocks left
        return True

    # ---- internals

    def _take_ref(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._block_hashes[block_id] = None
            self._events.evicted(block_hash)
        self._ref_counts[block_id] = 1
        return block_id

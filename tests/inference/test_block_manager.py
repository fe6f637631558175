"""Block manager: reference counts, free list, copy-on-write and prefix caching never go wrong.

Reference: an explicit model kept beside the block manager, `holds[b]`, the token prefix that
physical block b holds (all tokens of its sequence up to the block's last filled slot). Any
block a table uses must hold exactly that table's tokens, and any prefix-cache hit must hold
exactly the query's tokens. Hypothesis drives random sequences of allocate / append / fork /
free, with a real hash and with a 3-valued hash that collides all the time.
"""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from inference.block_manager import BlockManager, NoFreeBlocks

BS = 2  # tiny blocks: many block boundaries, many prefix hits


class BlockManagerMachine(RuleBasedStateMachine):
    hash_fn = staticmethod(hash)

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=BS, enable_prefix_caching=True, hash_fn=self.hash_fn)
        self.seqs: list[tuple[list[int], list[int]]] = []  # (block table, tokens), all K/V written
        self.holds: dict[int, tuple] = {}

    def _write(self, table, tokens, start, end, copies):
        for src, dst in copies:
            self.holds[dst] = self.holds[src]
        for j in range(start // BS, -(-end // BS)):
            self.holds[table[j]] = tuple(tokens[:min(end, (j + 1) * BS)])

    # A small alphabet and few lengths so that prompts share prefixes often.
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def allocate(self, tokens):
        need, hits = self.bm.prompt_blocks_needed(tokens)
        for i, b in enumerate(hits):
            assert self.holds[b] == tuple(tokens[:(i + 1) * BS]), "a prefix hit returned a block with other tokens"
        assert len(hits) * BS < len(tokens), "the block with the last token must be computed, never a hit"
        if need > self.bm.num_free_blocks:
            return
        free_before = self.bm.num_free_blocks
        table = self.bm.take_prefix(hits)
        copies = self.bm.allocate(table, tokens, len(hits) * BS, len(tokens))
        assert free_before - self.bm.num_free_blocks == need, "blocks taken differ from prompt_blocks_needed"
        self._write(table, tokens, len(hits) * BS, len(tokens), copies)
        self.seqs.append((table, list(tokens)))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        table, tokens = data.draw(st.sampled_from(self.seqs))
        need = self.bm.blocks_needed(table, len(tokens), len(tokens) + 1)
        if need > self.bm.num_free_blocks:
            return
        free_before = self.bm.num_free_blocks
        tokens.append(token)
        copies = self.bm.allocate(table, tokens, len(tokens) - 1, len(tokens))
        assert free_before - self.bm.num_free_blocks == need
        self._write(table, tokens, len(tokens) - 1, len(tokens), copies)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        table, tokens = data.draw(st.sampled_from(self.seqs))
        self.seqs.append((self.bm.fork(table), list(tokens)))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.seqs) - 1))
        table, _ = self.seqs.pop(i)
        self.bm.free(table)

    @invariant()
    def bookkeeping_matches_the_tables(self):
        self.bm.check_invariants([t for t, _ in self.seqs])

    @invariant()
    def every_table_holds_its_own_tokens(self):
        for table, tokens in self.seqs:
            assert len(table) == -(-len(tokens) // BS)
            for j, b in enumerate(table):
                assert self.holds[b] == tuple(tokens[:min(len(tokens), (j + 1) * BS)]), \
                    "a block was overwritten by another sequence (missing copy-on-write?)"


class CollidingHashMachine(BlockManagerMachine):
    hash_fn = staticmethod(lambda x: hash(x) % 3)


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = SETTINGS
TestBlockManagerWithHashCollisions = CollidingHashMachine.TestCase
TestBlockManagerWithHashCollisions.settings = SETTINGS


def test_fork_shares_blocks_and_copy_on_write_gives_the_writer_a_private_copy():
    bm = BlockManager(8, 4)
    parent = bm.take_prefix([])
    bm.allocate(parent, [1, 2, 3, 4, 5, 6], 0, 6)  # 2 blocks, the second half full
    child = bm.fork(parent)
    assert child == parent and [bm.ref_count[b] for b in parent] == [2, 2]
    copies = bm.allocate(child, [1, 2, 3, 4, 5, 6, 9], 6, 7)
    assert copies == [(parent[1], child[1])] and child[0] == parent[0] and child[1] != parent[1]
    assert bm.ref_count[parent[1]] == 1 and bm.ref_count[child[1]] == 1
    assert bm.allocate(parent, [1, 2, 3, 4, 5, 6, 7], 6, 7) == [], "the last holder writes in place"


def test_freed_cached_blocks_are_reused_on_a_hit_and_evicted_least_recent_first():
    bm = BlockManager(4, 2)
    a = bm.take_prefix([])
    bm.allocate(a, [1, 2, 3, 4, 5], 0, 5)  # blocks [1,2] [3,4] [5]
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.free_cached) == 2
    need, hits = bm.prompt_blocks_needed([1, 2, 3, 4, 7])
    assert hits == a[:2] and need == 3, "two cached blocks revived + one new"
    # A prompt with nothing in common evicts the tail block [3,4] before the prefix block [1,2].
    b = bm.take_prefix([])
    bm.allocate(b, [8, 8, 8, 8, 8, 8], 0, 6)
    assert bm.match_prefix([1, 2, 3, 4, 0]) == a[:1]


def test_prefix_hit_compares_tokens_not_only_hashes():
    bm = BlockManager(8, 2, hash_fn=lambda x: 0)  # every block hashes alike
    a = bm.take_prefix([])
    bm.allocate(a, [1, 2, 3], 0, 3)
    assert bm.match_prefix([1, 2, 9]) == a[:1]
    assert bm.match_prefix([5, 6, 9]) == [], "same hash, different tokens: a miss"


def test_freeing_twice_is_an_error_and_an_empty_pool_says_so():
    bm = BlockManager(1, 2)
    t = bm.take_prefix([])
    bm.allocate(t, [1], 0, 1)
    with pytest.raises(NoFreeBlocks, match="all 1 KV blocks are in use"):
        bm.allocate(t, [1, 2, 3], 1, 3)
    bm2 = BlockManager(2, 2)
    t2 = bm2.take_prefix([])
    bm2.allocate(t2, [1], 0, 1)
    bm2.free(t2)
    with pytest.raises(RuntimeError, match="double free"):
        bm2.free(t2)


def test_kv_utilisation_counts_filled_slots_of_used_blocks():
    bm = BlockManager(8, 4)
    t = bm.take_prefix([])
    bm.allocate(t, list(range(5)), 0, 5)  # 4 + 1 of 8 slots
    assert bm.kv_utilisation() == 5 / 8
    child = bm.fork(t)  # shared blocks count once
    assert bm.kv_utilisation() == 5 / 8
    bm.allocate(child, list(range(6)), 5, 6)  # copy-on-write: a second copy of the partial block
    assert bm.kv_utilisation() == (4 + 1 + 2) / 12

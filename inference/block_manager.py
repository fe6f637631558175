"""The block manager of a paged KV cache: free list, reference counts, copy-on-write, prefix caching.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180), the vLLM paper. Prefix caching follows vLLM's
automatic prefix caching (chained block hashes, freed cached blocks evicted in LRU order).
Reference it is tested against: an explicit model of which tokens every block holds, in the
hypothesis property tests of tests/inference/test_block_manager.py.

The KV memory of every layer is cut into `num_blocks` blocks of `block_size` token slots.
This class only does the bookkeeping; it never touches a tensor. A sequence owns a *block
table*, a plain list of physical block ids: logical block i (tokens i*bs .. i*bs+bs-1) lives
in physical block table[i]. Tables are owned by the caller (the scheduler); every method here
that changes a table says so.

Invariants (checked by `check_invariants`, and by the property tests after every operation):
- a block's ref_count equals the number of tables that hold it;
- a block is free (ref_count 0) or in use, never both; no block is lost;
- a prefix-cache hit returns only blocks whose whole prefix of tokens equals the query's.

Sliding windows (inference/kv_groups.py). A model whose layers attend over different windows keeps
one table per group of layers, all over this one pool of blocks; `group` names the table's group in
the calls that register or match prefixes (each group has its own chain, rooted at `_root(group)`),
and a windowed group's `allocate` first gives back the blocks wholly before its window. A given-back
entry of a table becomes RELEASED (-1); such entries always form the table's prefix, counted by
`BlockTable.released`.

Prefix caching. A full block is keyed by h_i = hash(h_{i-1}, tokens of block i), so a key
names the whole prefix up to and including the block, not just its own 16 tokens. A hash can
collide, so a hit also compares the stored (parent, tokens) with the query's, where parent is
a content id that is never reused. A cached block whose last holder frees it is not wiped: it
goes to an LRU list of free-but-cached blocks, and is only evicted (its hash forgotten) when
no never-cached free block is left.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque


RELEASED = -1  # a table entry whose block was given back (a windowed group's block before its window)


class BlockTable(list):
    """A sequence's block table for one group of layers: physical block ids by logical block. Its first
    `released` entries are RELEASED: the blocks before a windowed group's window, given back to the pool."""
    __slots__ = ("released",)

    def __init__(self, blocks=(), released: int = 0):
        super().__init__(blocks)
        self.released = released


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation finds the pool empty; the scheduler checks before allocating."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, hash_fn=hash):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn  # tests pass a weak hash to force collisions
        self.ref_count = [0] * num_blocks
        self.filled = [0] * num_blocks  # token slots written in each block (for the utilisation figure)
        self.free_uncached: deque[int] = deque(range(num_blocks))  # free blocks holding nothing reusable
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks  # (parent content id, tokens), compared on a hit
        self.block_uid: list[int | None] = [None] * num_blocks  # content id: one per distinct (prefix, tokens)
        self._uids = itertools.count()
        self.num_used = 0  # blocks with ref_count > 0
        self.filled_in_use = 0  # sum of `filled` over used blocks

    # ---- counting ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)  # ceil

    def kv_utilisation(self) -> float:
        """Token slots holding a token / slots in blocks that are in use (1.0 when nothing is)."""
        return self.filled_in_use / (self.num_used * self.block_size) if self.num_used else 1.0

    # ---- prefix cache ---------------------------------------------------------------------------

    @staticmethod
    def _root(group: int):
        """The parent of a group's first block: None for group 0, a negative number (never a content id) for
        the others, so that equal tokens in two groups (two sets of layers) never match each other."""
        return None if group == 0 else -1 - group

    def _key(self, parent: int | None, token_ids, i: int) -> tuple:
        bs = self.block_size
        return parent, tuple(token_ids[i * bs:(i + 1) * bs])

    def match_prefix(self, token_ids: list[int], group: int = 0) -> list[int]:
        """Cached blocks holding the longest prefix of `token_ids`, in order (no refs are taken).

        The block holding the last token is never matched: its logits must be computed, and its
        K/V are written by that computation, so it must be a block of the sequence's own.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        h = parent = self._root(group)
        for i in range((len(token_ids) - 1) // self.block_size):
            key = self._key(parent, token_ids, i)
            h = self.hash_fn((h, key[1]))
            b = self.cached.get(h)
            if b is None or self.block_key[b] != key:  # a miss, or a hash collision
                break
            hits.append(b)
            parent = self.block_uid[b]
        return hits

    def _register(self, table: list[int], token_ids: list[int], i: int, group: int = 0) -> None:
        """Make full block table[i] findable by later prompts starting with token_ids[:(i+1)*bs]."""
        b = table[i]
        if self.block_uid[b] is not None:
            return  # already registered (a prefix hit, or registered by an earlier step)
        if i > 0 and (table[i - 1] == RELEASED or self.block_uid[table[i - 1]] is None):
            return  # the chain is broken (the parent was given back or could not be registered): unreachable
        root = self._root(group)
        parent = self.block_uid[table[i - 1]] if i > 0 else root
        key = self._key(parent, token_ids, i)
        h = self.hash_fn((self.block_hash[table[i - 1]] if i > 0 else root, key[1]))
        other = self.cached.get(h)
        if other is not None and self.block_key[other] == key:
            # The same content is cached in another block (two equal prompts in one step): share
            # its content id so children chain on, but leave the dictionary pointing at the other.
            self.block_hash[b], self.block_key[b], self.block_uid[b] = h, key, self.block_uid[other]
            return
        if other is not None:
            return  # a hash collision with different content: this block stays uncached
        self.cached[h] = b
        self.block_hash[b], self.block_key[b], self.block_uid[b] = h, key, next(self._uids)

    def _forget(self, b: int) -> None:
        if self.block_hash[b] is not None and self.cached.get(self.block_hash[b]) == b:
            del self.cached[self.block_hash[b]]
        self.block_hash[b] = self.block_key[b] = self.block_uid[b] = None

    def _is_cached(self, b: int) -> bool:
        return self.block_hash[b] is not None and self.cached.get(self.block_hash[b]) == b

    # ---- allocation -----------------------------------------------------------------------------

    def _set_filled(self, b: int, n: int) -> None:
        self.filled_in_use += n - self.filled[b]
        self.filled[b] = n

    def _take(self) -> int:
        if self.free_uncached:
            b = self.free_uncached.popleft()
        elif self.free_cached:
            b, _ = self.free_cached.popitem(last=False)  # evict the least recently freed cached block
            self._forget(b)
        else:
            raise NoFreeBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.ref_count[b] = 1
        self.num_used += 1
        self.filled[b] = 0
        return b

    def _incref(self, b: int) -> None:
        if self.ref_count[b] == 0:  # a free cached block comes back to life: a prefix-cache hit
            del self.free_cached[b]
            self.num_used += 1
            self.filled_in_use += self.filled[b]
        self.ref_count[b] += 1

    def blocks_needed(self, table: list[int], start: int, end: int, window: int | None = None) -> int:
        """Free blocks `allocate(table, ..., start, end, window=window)` will take: new blocks, plus one copy
        if the block that receives token `start` is shared, less the blocks its window gives back to the
        free list first (those it alone holds). Never below 0."""
        new = max(0, self.blocks_for(end) - len(table))
        i = start // self.block_size
        cow = i < len(table) and self.ref_count[table[i]] > 1
        freed = sum(self.ref_count[table[j]] == 1 for j in self._outside_window(table, start, window))
        return max(0, new + int(cow) - freed)

    def _outside_window(self, table: list[int], start: int, window: int | None) -> list[int]:
        """Indices of the table's held blocks that lie wholly before the window of a query at `start` (which
        sees positions start - window + 1 .. start): a block j ends at (j + 1) * bs - 1 < start - window + 1.
        Given-back entries form the table's prefix, so the walk down from the last such block stops at the
        first of them: each block is visited once over a sequence's life."""
        if window is None:
            return []
        out, j = [], min((start - window + 1) // self.block_size, len(table)) - 1
        while j >= 0 and table[j] != RELEASED:
            out.append(j)
            j -= 1
        return out

    def release_outside_window(self, table: BlockTable, start: int, window: int | None) -> None:
        """Give back the blocks of a windowed group's table that no query at `start` or later can see; changes
        `table` (their entries become RELEASED). A block another table shares stays with it; a cached block
        stays findable until it is evicted, as any freed cached block does, so its K/V are intact while served."""
        outside = self._outside_window(table, start, window)
        if outside:
            self.free([table[j] for j in outside])
            for j in outside:
                table[j] = RELEASED
            table.released = max(table.released, outside[0] + 1)

    def prompt_blocks_needed(self, token_ids: list[int], group: int = 0) -> tuple[int, list[int]]:
        """(free blocks needed to admit this prompt, its prefix-cache hits in `group`'s chain)."""
        hits = self.match_prefix(token_ids, group)
        revived = sum(self.ref_count[b] == 0 for b in hits)  # hits sitting in the free list
        return self.blocks_for(len(token_ids)) - len(hits) + revived, hits

    def take_prefix(self, hits: list[int]) -> BlockTable:
        """A new table starting with the hit blocks (their refs taken); extend it with `allocate`."""
        for b in hits:
            self._incref(b)
        return BlockTable(hits)

    def allocate(self, table: list[int], token_ids: list[int], start: int, end: int, group: int = 0,
                 window: int | None = None) -> list[tuple[int, int]]:
        """Give `table` slots for tokens start .. end-1 about to be written; changes `table`.

        Returns the copy-on-write copies [(src, dst)] that the KV pool must do before the write:
        a block shared with another table (after `fork`) is never written; the writer gets a
        private copy instead. Full blocks are registered in the prefix cache now, before the
        forward pass that fills them: every layer writes a step's K/V before any attention of
        that layer reads, so a later prompt of the same step may already hit them.
        window: a windowed group's table (a `BlockTable`) first gives back the blocks before the window
        of the query at `start` (`release_outside_window`).
        """
        if window is not None:
            self.release_outside_window(table, start, window)
        bs, copies = self.block_size, []
        i = start // bs
        if i < len(table) and self.ref_count[table[i]] > 1:
            src, dst = table[i], self._take()
            self.ref_count[src] -= 1
            self._set_filled(dst, self.filled[src])
            table[i] = dst
            copies.append((src, dst))
        while len(table) < self.blocks_for(end):
            table.append(self._take())
        for j in range(i, self.blocks_for(end)):
            self._set_filled(table[j], min(bs, end - j * bs))
            if self.enable_prefix_caching and end >= (j + 1) * bs:
                self._register(table, token_ids, j, group)
        return copies

    def fork(self, table: list[int]) -> BlockTable:
        """A child table sharing every block of `table` (parallel sampling); copies happen on write."""
        for b in table:
            if b != RELEASED:
                self._incref(b)
        return BlockTable(table, getattr(table, "released", 0))

    def free(self, table: list[int]) -> None:
        """Drop `table`'s references (the caller discards the table). Blocks are released last
        first, so the LRU evicts a sequence's tail before its prefix, which is likelier reused."""
        for b in reversed(table):
            if b == RELEASED:
                continue
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than it was taken (double free)")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.num_used -= 1
                self.filled_in_use -= self.filled[b]
                if self._is_cached(b):
                    self.free_cached[b] = None  # most recently freed: evicted last
                else:
                    self._forget(b)
                    self.free_uncached.append(b)

    # ---- checking ------------------------------------------------------------------------------

    def check_invariants(self, tables: list[list[int]]) -> None:
        """Raise AssertionError unless the bookkeeping matches `tables`, all the live tables."""
        held = [0] * self.num_blocks
        for t in tables:
            for j, b in enumerate(t):
                assert b != RELEASED or j < getattr(t, "released", 0), "a given-back entry outside the table's prefix"
                if b != RELEASED:
                    held[b] += 1
        assert held == self.ref_count, "a block's ref_count differs from the number of tables holding it"
        free = list(self.free_uncached) + list(self.free_cached)
        assert len(free) == len(set(free)), "a block is twice in the free lists"
        assert all(self.ref_count[b] == 0 for b in free), "a block is both free and in use"
        assert len(free) + sum(r > 0 for r in self.ref_count) == self.num_blocks, "a block leaked"
        assert all(self._is_cached(b) for b in self.free_cached), "an uncached block is in the cached free list"
        assert all(self.block_key[b] is not None for b in self.cached.values())
        assert self.num_used == sum(r > 0 for r in self.ref_count)
        assert self.filled_in_use == sum(f for f, r in zip(self.filled, self.ref_count) if r > 0)


class StateSlots:
    """The per-sequence state of layers that keep one (Mamba-2's convolution window and SSM state) lives
    in `num_slots` fixed slots, one per running sequence: taken on admission and on fork, given back on
    finish and on preemption. Like this class's blocks, only bookkeeping: the pool holds the tensors.

    A state cannot be shared the way a block is: it is overwritten at every step, so a fork gets a
    copy of its parent's state at once (no copy-on-write), and a prefix of blocks cannot restore the
    state after it (the engine turns prefix caching off for such models)."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"need num_slots >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.free_slots: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def take(self) -> int:
        if not self.free_slots:
            raise NoFreeBlocks(f"all {self.num_slots} state slots are in use")
        return self.free_slots.popleft()

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self.free_slots:
            raise RuntimeError(f"state slot {slot} freed but not in use (double free)")
        self.free_slots.append(slot)

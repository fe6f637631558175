"""Sliding-window layers in the paged cache: layers grouped by window, one block table per group, one pool.

A sliding-window layer (a `KVSpec` with `window`; Gemma 2 and 3, Mistral 7B v0.1) never again reads a key
older than its window, so its blocks before the window can go back to the pool while the global layers
of the same sequence keep all of theirs. The blocks of every layer can then no longer share one table:
the layout is vLLM v1's "hybrid allocator" (its KV cache groups), in a form without padding.

- `table_groups`: the attention layers, grouped by window into groups of g layers each, g the greatest
  common divisor of the number of layers of each window (Gemma 3 1B: 4 global and 22 local layers, g = 2:
  2 global and 11 local groups; a model without windows: one group of all its layers, today's layout).
  Every group has its own block table per sequence.
- One pool of blocks for every group (`PagedKVPool`): a block is g pages, one per slot of a group, and
  layer j of any group reads slot j. Blocks of equal size let a block go from a local group to a global one
  as the workload shifts: no share of the memory is set aside for either.
- `GroupedBlocks`: a sequence's tables, one per group, kept in step over one `BlockManager`: allocated,
  forked and freed together (so every table of a sequence has the same logical length), a windowed
  group's table giving back its blocks before the window as it goes (`BlockManager.allocate(window=)`).
  A prefix hit is the longest prefix that every group finds in its own chain.

Why groups of equal size rather than a pool per window: the split of memory between windows would have
to be fixed in advance, and a prompt's prefill needs all its blocks in every layer (its queries read
all of them within the pass) before a windowed group gives most back. Why the greatest common divisor
rather than vLLM's smallest count with padding slots: no slot of a block is ever empty, so the pool's
bytes are exactly what each layer keeps; the price is more tables when the counts share no factor.
notes/paged-attention.md has the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inference.block_manager import BlockManager, BlockTable


@dataclass(frozen=True)
class TableGroup:
    """Layers that share one block table per sequence: slot j of each of the group's blocks holds layers[j]."""
    layers: tuple[int, ...]
    window: int | None  # their sliding window; None: full causal attention (every block is kept)


def table_groups(specs: list) -> list[TableGroup]:
    """The layers that keep something per token, grouped by window (global groups first), g layers a group.

    Without a window, one group of every such layer (none at all: one empty group, whose blocks are
    bookkeeping only). With windows, every such layer must store the same per-token shapes, since slot j
    of a block serves layer j of every group."""
    layers = [i for i, s in enumerate(specs) if s is not None and s.per_token]
    by_window: dict[int | None, list[int]] = {}
    for i in layers:
        by_window.setdefault(getattr(specs[i], "window", None), []).append(i)
    if set(by_window) <= {None}:
        return [TableGroup(tuple(layers), None)]
    shapes = {tuple(sorted(specs[i].per_token.items())) for i in layers}
    if len(shapes) > 1:
        raise ValueError(f"the paged cache pages sliding-window layers in blocks shared by every window, so every "
                         f"layer must cache the same per-token shapes; these layers cache {len(shapes)} different "
                         f"ones ({sorted(shapes)})")
    g = math.gcd(*(len(v) for v in by_window.values()))
    order = sorted(by_window, key=lambda w: (w is not None, w or 0))  # global first, then windows ascending
    return [TableGroup(tuple(by_window[w][i:i + g]), w) for w in order for i in range(0, len(by_window[w]), g)]


class GroupedBlocks:
    """One sequence's block tables, one per `TableGroup`, kept in step over one `BlockManager`.

    Every call takes or returns the list of a sequence's tables, in group order; the scheduler holds
    them (`Sequence.tables`). Only bookkeeping: the pool holds the tensors."""

    def __init__(self, blocks: BlockManager, windows: list[int | None]):
        if not windows:
            raise ValueError("give at least one group (a model without attention layers has one empty group)")
        self.blocks, self.windows = blocks, list(windows)

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def empty(self) -> list[BlockTable]:
        return [BlockTable() for _ in self.windows]

    def peak_blocks(self, num_tokens: int) -> int:
        """The most blocks one sequence of `num_tokens` stored tokens can hold at once: every group's blocks
        for the whole sequence, as when it is (re)computed from its first token in one pass, before a windowed
        group gives any back."""
        return len(self.windows) * self.blocks.blocks_for(num_tokens)

    def blocks_needed(self, tables: list[BlockTable], start: int, end: int) -> int:
        return sum(self.blocks.blocks_needed(t, start, end, w) for t, w in zip(tables, self.windows))

    def allocate(self, tables: list[BlockTable], token_ids: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Every table gets slots for tokens start .. end-1 (a windowed one first gives back the blocks before
        the window of the query at `start`); returns all the copy-on-write copies."""
        copies = []
        for g, (t, w) in enumerate(zip(tables, self.windows)):
            copies += self.blocks.allocate(t, token_ids, start, end, group=g, window=w)
        return copies

    def prompt_blocks_needed(self, token_ids: list[int]) -> tuple[int, list[list[int]]]:
        """(free blocks needed to admit this prompt, each group's hits): the hit is the longest prefix of blocks
        found in every group's chain, so that every layer has the K/V of the positions before it."""
        hits = [self.blocks.match_prefix(token_ids, g) for g in range(len(self.windows))]
        n = min(len(h) for h in hits)
        hits = [h[:n] for h in hits]
        revived = sum(self.blocks.ref_count[b] == 0 for h in hits for b in h)  # hits sitting in the free list
        return len(self.windows) * (self.blocks.blocks_for(len(token_ids)) - n) + revived, hits

    def take_prefix(self, hits: list[list[int]]) -> list[BlockTable]:
        return [self.blocks.take_prefix(h) for h in hits]

    def fork(self, tables: list[BlockTable]) -> list[BlockTable]:
        return [self.blocks.fork(t) for t in tables]

    def free(self, tables: list[BlockTable]) -> None:
        for t in tables:
            self.blocks.free(t)

"""Continuous batching: which sequences run in the next forward pass, and what happens when memory runs out.

Papers: "Orca: A Distributed Serving System for Transformer-Based Generative Models"
(Yu et al., OSDI 2022): iteration-level scheduling, where requests join and leave the batch at
every step instead of waiting for the whole batch; "Efficient Memory Management for Large
Language Model Serving with PagedAttention" (Kwon et al., 2023, arXiv:2309.06180): preemption
by recompute when the block pool is exhausted. Tested in tests/inference/test_engine.py
(same greedy tokens as the naive cache, with requests arriving mid-run and forced preemption)
and tests/inference/test_scheduler.py.

Policy, one step at a time:
1. Running sequences, oldest first, each get the slot for their next token. When the pool
   has no free block, the newest running sequence is preempted: its blocks are freed and it
   goes back to the front of the queue; later it is recomputed from its tokens (prompt and
   what it had generated), usually cheaply, as its full blocks are still in the prefix cache.
2. Waiting sequences are admitted first come, first served, while the step's token budget,
   the seat limit and the free blocks allow; no request jumps the queue.
Prefill (a whole prompt) and decode (one token) share one forward pass: to the model a
decoding sequence is just a sequence with one token left to compute.

For models whose layers keep a per-sequence state (Mamba-2), each running sequence also holds a
state slot (`StateSlots`): taken on admission, copied on fork, given back on finish and on
preemption, after which the sequence is recomputed from its first token into a fresh state.
There is a slot per seat (max_num_seqs), so admission never waits for one.

A model with sliding-window layers keeps one block table per group of layers (inference/kv_groups.py):
a sequence's `tables`, which `GroupedBlocks` allocates, forks and frees together; a windowed group's
table gives back its blocks before the window as the sequence advances.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import torch

from inference.block_manager import BlockManager, BlockTable, StateSlots
from inference.kv_groups import GroupedBlocks
from inference.sampling import SamplingParams
from inference.step_metadata import ScheduledSeq


@dataclass(eq=False)
class Sequence:
    """One completion: its tokens (prompt + generated), its blocks and where its computation stands."""
    request_id: str
    index: int  # completion number within its request (parallel sampling), seeded with seed + index
    arrival: int  # order of submission: first come, first served, and the newest is preempted first
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    pending_forks: int = 0  # siblings to create from this sequence's first sample (n - 1 on the parent)
    tables: list[BlockTable] = field(default_factory=list)  # its block table in each group of layers (kv_groups.py)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    state_slot: int = -1  # its slot of per-sequence state (models with a StateSpec layer), -1 when none
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop token, EOS, a stop string), "length" (max_new_tokens), "abort"

    @property
    def block_table(self) -> list[int]:
        """Its table in the first group (a model without windows has only that one); [] when it holds none."""
        return self.tables[0] if self.tables else []

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def priority(self) -> tuple[int, int]:
        return self.arrival, self.index


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]  # in the order of the packed batch
    slices: list[ScheduledSeq]
    copies: list[tuple[int, int]]  # copy-on-write (src, dst) block copies to do before the pass
    preempted: list[Sequence]
    num_prefill_tokens: int  # tokens computed for sequences that were waiting (prompts, recomputes)
    num_cached_tokens: int  # tokens of admitted sequences found in the prefix cache (not computed)


class Scheduler:
    def __init__(self, blocks: BlockManager | GroupedBlocks, max_num_seqs: int = 256, max_num_batched_tokens: int = 4096,
                 state_slots: StateSlots | None = None):
        # One group of layers, the one table per sequence of a model without windows, unless told otherwise.
        self.blocks = blocks if isinstance(blocks, GroupedBlocks) else GroupedBlocks(blocks, [None])
        self.state_slots = state_slots  # None: the model keeps no per-sequence state
        if state_slots is not None and state_slots.num_slots < max_num_seqs:
            raise ValueError(f"{state_slots.num_slots} state slots for max_num_seqs={max_num_seqs}: every seat needs one")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        self.blocks.free(seq.tables)
        seq.tables, seq.num_computed = [], 0
        self._free_state(seq)
        preempted.append(seq)

    def _take_state(self, seq: Sequence) -> None:
        if self.state_slots is not None:
            seq.state_slot = self.state_slots.take()

    def _free_state(self, seq: Sequence) -> None:
        if self.state_slots is not None and seq.state_slot >= 0:
            self.state_slots.free(seq.state_slot)
            seq.state_slot = -1

    def schedule(self) -> SchedulerOutput:
        bs, budget = self.blocks.block_size, self.max_num_batched_tokens
        seqs: list[Sequence] = []
        slices: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []

        # 1. Decodes of running sequences, oldest first; preempt from the newest end when out of blocks.
        queue = deque(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            start, end = seq.num_computed, len(seq.token_ids)
            while self.blocks.blocks_needed(seq.tables, start, end) > self.blocks.num_free_blocks:
                victim = queue.pop() if queue else seq
                self._preempt(victim, preempted)
                if victim is seq:
                    break
            else:
                copies += self.blocks.allocate(seq.tables, seq.token_ids, start, end)
                kept.append(seq)
                seqs.append(seq)
                slices.append(_slice(seq, start, end))
                budget -= end - start
        self.running = kept
        # The preempted go back to the front of the queue, oldest first, ahead of newer arrivals.
        for seq in sorted(preempted, key=lambda s: s.priority, reverse=True):
            self.waiting.appendleft(seq)

        # 2. Admit waiting sequences in arrival order while budget, seats and blocks allow.
        num_prefill = num_cached = 0
        while self.waiting:
            seq = self.waiting[0]
            need, hits = self.blocks.prompt_blocks_needed(seq.token_ids)
            new_tokens = len(seq.token_ids) - len(hits[0]) * bs
            # One prompt longer than the whole budget may still go, alone with the decodes.
            over_budget = new_tokens > budget and num_prefill > 0
            no_seat = len(self.running) + 1 + seq.pending_forks > self.max_num_seqs
            if over_budget or no_seat or need > self.blocks.num_free_blocks or preempted:
                # With a preemption in this step memory is short: admitting now would only be undone.
                break
            self.waiting.popleft()
            seq.tables = self.blocks.take_prefix(hits)
            seq.num_computed = len(hits[0]) * bs
            self._take_state(seq)
            start, end = seq.num_computed, len(seq.token_ids)
            copies += self.blocks.allocate(seq.tables, seq.token_ids, start, end)
            bisect.insort(self.running, seq, key=lambda s: s.priority)  # a recomputed sequence is older
            seqs.append(seq)
            slices.append(_slice(seq, start, end))
            budget -= end - start
            num_prefill += end - start
            num_cached += start
        if not seqs and self.has_unfinished():
            raise RuntimeError("scheduler made no progress: the first waiting sequence needs more blocks than the "
                               "whole pool has; this should have been refused at submission")
        return SchedulerOutput(seqs, slices, copies, preempted, num_prefill, num_cached)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` beside `parent`, sharing all its blocks (parallel sampling). A child of a model
        with per-sequence state gets a slot of its own: the caller copies the parent's state into it."""
        child.tables = self.blocks.fork(parent.tables)
        child.num_computed = parent.num_computed
        self._take_state(child)
        bisect.insort(self.running, child, key=lambda s: s.priority)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        self.blocks.free(seq.tables)
        seq.tables = []
        self._free_state(seq)
        self.running.remove(seq)

    def abort(self, seq: Sequence, reason: str) -> None:
        """End `seq` where it stands, waiting or running: its blocks and state slot go back now."""
        if seq in self.running:
            self.finish(seq, reason)
            return
        self.waiting.remove(seq)  # a waiting sequence holds no blocks (a preempted one gave them back)
        seq.finished, seq.finish_reason = True, reason

def _slice(seq: Sequence, start: int, end: int) -> ScheduledSeq:
    """What the step computes for `seq`: tokens start .. end-1, through its tables (the first group's, and any
    others)."""
    return ScheduledSeq(seq.tables[0], start, end, seq.state_slot, tuple(seq.tables[1:]))

"""What one step of the paged engine tells the kernels: the scheduled sequences and their index tensors.

A forward pass of the engine packs every scheduled sequence into one row: input_ids (1, N) holds,
sequence after sequence, the tokens whose K/V are not yet in the cache (a whole prompt for a new
sequence, one token for a decoding one). `ScheduledSeq` is what the scheduler decides for one
sequence; `StepMetadata` the index tensors that every layer of the pass shares: where each token's
K/V is written, each sequence's block table, and the maps between the packed row and a padded batch
(B, Tmax). They are built on the host once per step (`host_metadata`), as one flat tensor, so that a
single copy moves them to the GPU and a CUDA graph can replay them from a static buffer
(inference/cuda_graphs.py). Checked against each other and against the reference attention by
tests/inference/test_paged_attention.py.

A model with sliding-window layers has one block table per group of layers (inference/kv_groups.py):
group 0's table and slots are `block_tables` and `slot_mapping`, the other groups' `group_tables` and
`group_slots` (empty without windows). A windowed table's given-back entries (RELEASED, before its window)
become the scratch block, so that every row stays a plain array of valid block ids.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import torch


@dataclass
class ScheduledSeq:
    """One sequence in a forward pass: compute K/V (and logits) for token positions start .. end-1."""
    block_table: list[int]
    start: int
    end: int
    state_slot: int = -1  # its slot of per-sequence state (-1: the model keeps none); start == 0 means a fresh state
    extra_tables: tuple = ()  # its tables in groups 1, 2, ... of layers (a model with sliding windows)

    @property
    def tables(self) -> tuple:
        """Its table in every group, group 0 first."""
        return (self.block_table, *self.extra_tables)


@dataclass
class StepMetadata:
    """Index tensors of one forward pass, built on the host once per step (never per layer).

    N packed tokens, B sequences, Tmax the most new tokens of one sequence, nb the longest table.
    """
    input_ids: torch.Tensor  # (1, N) the tokens to compute, sequence after sequence
    positions: torch.Tensor  # (1, N) position of each token within its sequence
    slot_mapping: torch.Tensor  # (N,) flat slot (block * bs + offset) each token's K/V is written to
    block_tables: torch.Tensor  # (B, nb) physical blocks of each sequence, padded with the scratch block
    q_index: torch.Tensor  # (B, Tmax) packed index of sequence b's t-th new token (0 for padding)
    q_pos: torch.Tensor  # (B, Tmax) its position (0 for padding)
    out_index: torch.Tensor  # (N,) b * Tmax + t for each packed token
    last_index: torch.Tensor  # (B,) packed index of each sequence's last token: its logits are sampled
    seq_index: torch.Tensor  # (N,) which sequence each packed token belongs to
    query_start: torch.Tensor  # (B,) packed index of each sequence's first new token
    group_tables: torch.Tensor | None = None  # (G - 1, B, nb) the tables of groups 1 .. G-1 (windows), or None
    group_slots: torch.Tensor | None = None  # (G - 1, N) their slots for each packed token, or None

    def tables(self, group: int) -> torch.Tensor:
        """(B, nb) the block tables of one group of layers."""
        return self.block_tables if group == 0 else self.group_tables[group - 1]

    def slots(self, group: int) -> torch.Tensor:
        """(N,) where each packed token's K/V of one group of layers is written."""
        return self.slot_mapping if group == 0 else self.group_slots[group - 1]

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shapes: list[tuple]) -> StepMetadata:
        """Views into one flat tensor (what `host_metadata` returns), in field order."""
        views, i = [], 0
        for shape in shapes:
            n = math.prod(shape)
            views.append(flat[i:i + n].view(shape))
            i += n
        return cls(*views)


def host_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                  pad_batch_to: int | None = None, pad_blocks_to: int | None = None,
                  table_rows: TableRows | None = None) -> tuple[torch.Tensor, list]:
    """Every StepMetadata field, flattened into one CPU tensor (so one copy moves it to the GPU), and
    the fields' shapes. A step with prompts is built with vectorised torch ops (no Python loop over
    tokens); a decode-only step, one token per sequence, from plain lists, which is faster for it.

    pad_batch_to / pad_blocks_to pad B and nb for a CUDA graph of fixed shape: padding rows
    are one-token sequences at position 0 whose single block is the scratch block.
    """
    if all(s.end - s.start == 1 for s in seqs):  # decode-only
        return _decode_metadata(seqs, token_ids, block_size, scratch_block, pad_batch_to, pad_blocks_to, table_rows)
    return _packed_metadata(seqs, token_ids, block_size, scratch_block, pad_batch_to, pad_blocks_to)


def _packed_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                     pad_batch_to: int | None, pad_blocks_to: int | None) -> tuple[torch.Tensor, list]:
    """`host_metadata` of any step: sequences with any number of new tokens, packed."""
    B, bs = len(seqs), block_size
    Bp = pad_batch_to or B
    starts = torch.tensor([s.start for s in seqs] + [0] * (Bp - B))  # (Bp,)
    q_lens = torch.tensor([s.end - s.start for s in seqs] + [1] * (Bp - B))  # (Bp,)
    nb = max(pad_blocks_to or 0, max(len(s.block_table) for s in seqs))
    G = len(seqs[0].tables)
    rows = [list(t) + [scratch_block] * (nb - len(t)) for g in range(G) for t in [s.tables[g] for s in seqs]
            + [[]] * (Bp - B)]
    tables = torch.tensor(rows).view(G, Bp, nb)  # (G, Bp, nb)
    tables = tables.masked_fill(tables < 0, scratch_block)  # given-back entries (before a window): scratch
    ids = torch.tensor(token_ids + [0] * (Bp - B))  # (N,)
    N, Tmax = int(q_lens.sum()), int(q_lens.max())
    seq_index = torch.repeat_interleave(torch.arange(Bp), q_lens)  # (N,)
    query_start = torch.cumsum(q_lens, 0) - q_lens  # (Bp,)
    t_in_seq = torch.arange(N) - query_start[seq_index]  # (N,)
    pos = starts[seq_index] + t_in_seq  # (N,)
    slot = tables[:, seq_index, pos // bs] * bs + pos % bs  # (G, N)
    t = torch.arange(Tmax)
    valid = t[None] < q_lens[:, None]  # (Bp, Tmax)
    q_index = torch.where(valid, query_start[:, None] + t, 0)
    q_pos = torch.where(valid, starts[:, None] + t, 0)
    out_index = seq_index * Tmax + t_in_seq
    last_index = query_start + q_lens - 1
    parts = [ids[None], pos[None], slot[0], tables[0], q_index, q_pos, out_index, last_index, seq_index, query_start,
             tables[1:], slot[1:]]
    return torch.cat([p.reshape(-1) for p in parts]), [tuple(p.shape) for p in parts]


class TableRows:
    """The padded block-table rows of the previous decode step, kept to be reused.

    Converting a sequence's table (a Python list) to int64s costs ~40 ns an entry: 32 sequences of
    8k tokens in blocks of 16 are 16k entries, ~0.7 ms of host time in every decode step while the GPU
    waits. Between decode steps a table only grows by one block every block_size tokens, so most rows
    can be copied from the last step as they are. A row is reused when the sequence at that batch
    position holds the same table object with the same length and the same last entry: the block
    manager changes a table in place only by appending blocks, or by copy-on-write of the block that
    receives the next token, which is then the last one; a table rebuilt after preemption, a fork or
    a prefix hit is a new object. The rows keep their tables alive, so an object is never mistaken for
    a new one at the same address. tests/inference/test_paged_attention.py checks reuse against
    rebuilding from scratch over a run with appends, copy-on-write and preemption."""

    def __init__(self):
        # per group of layers: [(table, len, last, released, nb, row)] by batch position
        self.rows: dict[int, list[tuple]] = {}

    def row(self, b: int, table: list[int], nb: int, scratch_block: int, group: int = 0) -> array.array:
        """A windowed group's table also changes when it gives back blocks before its window (its `released`
        count), which is part of the key; those entries become the scratch block."""
        released = getattr(table, "released", 0)
        key = (len(table), table[-1] if table else -1, released, nb)
        rows = self.rows.setdefault(group, [])
        if b < len(rows) and rows[b][0] is table and rows[b][1:5] == key:
            return rows[b][5]
        row = array.array("q", table)
        row[:released] = array.array("q", [scratch_block]) * released
        row.extend(array.array("q", [scratch_block]) * (nb - len(table)))
        entry = (table, *key, row)
        if b < len(rows):
            rows[b] = entry
        else:
            rows.append(entry)
        return row


def _decode_metadata(seqs: list[ScheduledSeq], token_ids: list[int], bs: int, scratch_block: int,
                     pad_batch_to: int | None, pad_blocks_to: int | None,
                     table_rows: TableRows | None = None) -> tuple[torch.Tensor, list]:
    """`host_metadata` of a decode-only step, the engine's commonest, in plain Python lists and one
    tensor: the general path's ~25 small torch ops take several times as long on the host, and
    between CUDA-graph steps the GPU waits for the host. With one token per sequence, N = B and
    Tmax = 1, so every packing map is the identity. tests/inference/test_paged_attention.py checks
    it equals the general path. table_rows: the rows of the last call, reused where unchanged."""
    B = len(seqs)
    Bp = pad_batch_to or B
    nb = max(pad_blocks_to or 0, max(len(s.block_table) for s in seqs))
    pos = [s.start for s in seqs] + [0] * (Bp - B)  # (Bp,) the new token's position
    rows = table_rows or TableRows()
    G = len(seqs[0].tables)
    tables, slots = [], []  # per group: (Bp * nb,) and (Bp,)
    for g in range(G):
        t = array.array("q")  # array.extend of an array is a memory copy
        for b, s in enumerate(seqs):
            t.extend(rows.row(b, s.tables[g], nb, scratch_block, g))
        t.extend(array.array("q", [scratch_block]) * (nb * (Bp - B)))
        tables.append(t)
        slots.append([t[b * nb + p // bs] * bs + p % bs for b, p in enumerate(pos)])
    slot = slots[0]
    ids = list(token_ids) + [0] * (Bp - B)
    ar = list(range(Bp))
    # Field order of StepMetadata: input_ids, positions, slot_mapping, block_tables, q_index,
    # q_pos, out_index, last_index, seq_index, query_start. Through array.array: torch.tensor(list)
    # converts ints one by one, several times slower.
    flat = array.array("q", ids + pos + slot)
    flat.extend(tables[0])
    flat.extend(ar + pos + ar + ar + ar + ar)
    for t in tables[1:]:
        flat.extend(t)
    for s in slots[1:]:
        flat.extend(array.array("q", s))
    flat = torch.frombuffer(flat, dtype=torch.int64)
    shapes = [(1, Bp), (1, Bp), (Bp,), (Bp, nb), (Bp, 1), (Bp, 1), (Bp,), (Bp,), (Bp,), (Bp,), (G - 1, Bp, nb),
              (G - 1, Bp)]
    return flat, shapes


def build_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                   device) -> StepMetadata:
    """One step's metadata on `device`, unpadded: what an eager forward pass of the engine reads."""
    flat, shapes = host_metadata(seqs, token_ids, block_size, scratch_block)
    return StepMetadata.from_flat(flat.to(device), shapes)

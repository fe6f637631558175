"""The paged KV cache on the model's side: one pool of blocks per layer, and the cache object
that one forward pass of the engine hands to the model.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180). Tested against the naive cache and against no cache
(tests/inference/test_engine.py), and its attention against a reference
(tests/inference/test_paged_attention.py).

A forward pass of the engine packs every scheduled sequence into one row: input_ids (1, N)
holds, sequence after sequence, the tokens whose K/V are not yet in the cache (a whole
prompt for a new sequence, one token for a decoding one). The model does not know; it sees
a cache that answers the same calls as `NaiveKVCache` (the `Cache` protocol of
architectures/common/cache.py):
    positions(1, N)    each token's position within its own sequence, (1, N)
    max_length()       None: lengths are per sequence, and the engine checked them at submission
    write(l, k=, v=)   this step's per-token tensors of layer l into their slots of the pool
    read(l)            a view of each sequence's blocks (gathered, or read in place by a kernel)
    state(l)           the step's sequences' per-sequence states of layer l, gathered from their slots
    advance(N)         nothing for blocks (the block manager did the bookkeeping before the pass);
                       the states the layers updated are scattered back to their slots
The pool holds whatever the layers declare per token (K and V; DeepSeek's latent vector), so
an architecture whose attention caches something else needs no change here. Layers that declare
a per-sequence `StateSpec` (Mamba-2's convolution window and SSM state) get `num_state_slots`
fixed slots instead of blocks, one per running sequence (inference/block_manager.py's
`StateSlots`). Such a layer finds its sequences' tokens in the packed row through `read`: a view
with no tensors whose `pack` gives each sequence a row (B, Tmax), right-padded, and whose mask
(B, Tmax, Tmax) lets the row's last query see exactly the row's real tokens.

Block `num_blocks` of the pool (one past the blocks the block manager hands out) is scratch:
padding rows of a CUDA-graph batch write there, so they never touch a sequence's blocks.

Quantized K/V (`kv_dtype`, inference/quantized_kv.py): the blocks hold codes and their scales
(int8, fp8: k, k_scale, v, v_scale, each (num_blocks + 1, bs, K, ...)); `write` quantizes, the
gather dequantizes what it gathered, and the Triton decode kernel reads codes and scales in place.
int4 (KIVI) quantizes a block's keys per channel over its bs tokens, so a block is quantized when it
fills; until then its tokens wait in full precision in the sequence's *residual*, a per-sequence slot
like a Mamba state (the scheduler's state slot), which `read` lays over the block it belongs to.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import torch

from architectures.common.cache import CacheSpec, CacheView, bytes_per_sequence
from inference.paged_attention import attention_mask, gather_blocks, paged_attention_reference
from inference.triton_kv_write import fused_write_reason, write_quantized_rows
from inference.quantized_kv import (KVFormat, bytes_per_group, check_int4_shapes, kv_format,
                                    residual_bytes_per_sequence)


class PagedKVPool:
    """The blocks of every layer, allocated once, shaped by what each layer declares it keeps.

    Layers with equal specs share one stacked tensor per stored name: for Llama 3, K and V of all
    L layers are two (L, num_blocks + 1, block_size, K, d) tensors (quantized: the codes, and beside
    them k_scale and v_scale of (L, num_blocks + 1, block_size, K, 1)). A layer that keeps nothing per
    token (no spec, or only per-sequence state) gets no blocks. A layer that keeps a per-sequence
    state gets {name: (num_state_slots, *shape)}: one slot per running sequence; with int4 every
    layer with blocks also gets a residual {name: (num_state_slots, block_size, *shape)}.
    """

    def __init__(self, specs: list[CacheSpec | None], num_blocks: int, block_size: int, dtype=torch.float32,
                 device="cpu", num_state_slots: int = 0, kv_dtype: str | None = None):
        self.format = fmt = self.block_format(kv_dtype, dtype, device, block_size)
        check_int4_shapes(specs, fmt)
        stateful = [i for i, s in enumerate(specs) if s is not None and s.per_sequence]
        if stateful and num_state_slots < 1:
            raise ValueError(f"layers {stateful} keep a per-sequence state ({type(specs[stateful[0]]).__name__}): "
                             f"give the pool num_state_slots >= 1, one per sequence that may run at once")
        if fmt.residual and num_state_slots < 1:
            raise ValueError("kv_dtype='int4' keeps each sequence's unfilled block in full precision: give the pool "
                             "num_state_slots >= 1, one per sequence that may run at once")
        self.num_state_slots = num_state_slots if stateful or fmt.residual else 0
        self.states: dict[int, dict[str, torch.Tensor]] = {  # layer -> {name: (num_state_slots, *shape)}
            i: {name: torch.zeros(num_state_slots, *shape, dtype=dtype, device=device)
                for name, shape in specs[i].per_sequence.items()} for i in stateful}
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        self.specs = list(specs)  # layer -> its declaration (a decode kernel reads a latent by its value width)
        groups: dict[CacheSpec, list[int]] = {}
        for i, spec in enumerate(specs):
            if spec is not None and spec.per_token:
                groups.setdefault(spec, []).append(i)
        per_block = block_size // fmt.token_group  # quantization groups per block: bs, or 1 for int4
        self.stacks: list[dict[str, torch.Tensor]] = []  # per group: {part: (layers, num_blocks + 1, per_block, *part)}
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}  # layer -> {name: per-token shape}
        self._where: dict[int, tuple[int, int]] = {}  # layer -> (group, index within the group)
        for g, (spec, layers) in enumerate(groups.items()):
            self.stacks.append({part: torch.zeros(len(layers), num_blocks + 1, per_block, *shape, dtype=dt,
                                                  device=device)
                                for name, full in spec.per_token.items()
                                for part, (shape, dt) in fmt.group_parts(name, full).items()})
            self._where.update({layer: (g, j) for j, layer in enumerate(layers)})
            self.shapes.update({layer: dict(spec.per_token) for layer in layers})
        # int4: layer -> {name: (num_state_slots, block_size, *shape)}, the full-precision tokens of each
        # sequence's last, unfilled block
        self.residual: dict[int, dict[str, torch.Tensor]] = {
            i: {name: torch.zeros(num_state_slots, block_size, *shape, dtype=dtype, device=device)
                for name, shape in shapes.items()} for i, shapes in self.shapes.items()} if fmt.residual else {}
        self.device = torch.device(device)

    @staticmethod
    def block_format(kv_dtype: str | None, dtype: torch.dtype, device, block_size: int) -> KVFormat:
        """The pool's storage format: int4 quantizes one key group per block, so its group is the block."""
        return kv_format(kv_dtype, dtype, device, block_size if kv_dtype == "int4" else None)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, num_state_slots: int = 0,
                  kv_dtype: str | None = None) -> "PagedKVPool":
        p = next(model.parameters())
        return cls(model.cache_specs(), num_blocks, block_size, p.dtype, p.device, num_state_slots, kv_dtype)

    @staticmethod
    def bytes_per_block(model, block_size: int, kv_dtype: str | None = None) -> int:
        """Bytes one block costs over all layers: block_size x the model's bytes per cached token, scales included."""
        p = next(model.parameters())
        fmt = PagedKVPool.block_format(kv_dtype, p.dtype, p.device, block_size)
        return block_size // fmt.token_group * bytes_per_group(model.cache_specs(), fmt)

    @staticmethod
    def bytes_per_state_slot(model) -> int:
        """Bytes one sequence's fixed-size state costs over all layers, whatever its length (0 for attention-only)."""
        return bytes_per_sequence(model.cache_specs(), next(model.parameters()).element_size())

    @staticmethod
    def bytes_per_residual_slot(model, block_size: int, kv_dtype: str | None = None) -> int:
        """int4: bytes of one sequence's residual, block_size tokens in full precision (0 for other formats)."""
        p = next(model.parameters())
        fmt = PagedKVPool.block_format(kv_dtype, p.dtype, p.device, block_size)
        return residual_bytes_per_sequence(model.cache_specs(), fmt)

    def nbytes(self) -> int:
        """Blocks, state slots and residual slots."""
        tensors = self.tensors() + self.state_tensors() + self.residual_tensors()
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every per-sequence state tensor, slot index in dimension 0."""
        return [t for layer in self.states.values() for t in layer.values()]

    def residual_tensors(self) -> list[torch.Tensor]:
        """int4: every residual tensor, slot index in dimension 0 (none for other formats)."""
        return [t for layer in self.residual.values() for t in layer.values()]

    def copy_states(self, copies: list[tuple[int, int]]) -> None:
        """Slot dst becomes a copy of slot src in every stateful layer, and of the residual (a forked sequence
        starts from its parent's)."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            for t in self.state_tensors() + self.residual_tensors():
                t[dst] = t[src]

    def tensors(self) -> list[torch.Tensor]:
        """Every stacked tensor, block index in dimension 1."""
        return [t for stack in self.stacks for t in stack.values()]

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The stored tensors of one layer: {part: (num_blocks + 1, block_size, *part)} ({name: (num_blocks + 1,
        block_size, *shape)} for plain storage; the middle dimension is 1 for int4); {} if it keeps none."""
        if layer not in self._where:
            return {}
        g, j = self._where[layer]
        return {name: t[j] for name, t in self.stacks[g].items()}

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src, in every layer, one indexed copy per tensor."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            for t in self.tensors():
                t[:, dst] = t[:, src]


def _index_copy(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i]. fp8 codes are copied as their bytes: torch's CPU index_copy_ has no fp8 kernel."""
    if dst.element_size() == 1 and dst.dtype != torch.int8:
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    dst.index_copy_(0, index, src)


@dataclass
class ScheduledSeq:
    """One sequence in a forward pass: compute K/V (and logits) for token positions start .. end-1."""
    block_table: list[int]
    start: int
    end: int
    state_slot: int = -1  # its slot of per-sequence state (-1: the model keeps none); start == 0 means a fresh state


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

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shapes: list[tuple]) -> "StepMetadata":
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
    rows = [s.block_table + [scratch_block] * (nb - len(s.block_table)) for s in seqs]
    tables = torch.tensor(rows + [[scratch_block] * nb] * (Bp - B))  # (Bp, nb)
    ids = torch.tensor(token_ids + [0] * (Bp - B))  # (N,)
    N, Tmax = int(q_lens.sum()), int(q_lens.max())
    seq_index = torch.repeat_interleave(torch.arange(Bp), q_lens)  # (N,)
    query_start = torch.cumsum(q_lens, 0) - q_lens  # (Bp,)
    t_in_seq = torch.arange(N) - query_start[seq_index]  # (N,)
    pos = starts[seq_index] + t_in_seq  # (N,)
    slot = tables[seq_index, pos // bs] * bs + pos % bs  # (N,)
    t = torch.arange(Tmax)
    valid = t[None] < q_lens[:, None]  # (Bp, Tmax)
    q_index = torch.where(valid, query_start[:, None] + t, 0)
    q_pos = torch.where(valid, starts[:, None] + t, 0)
    out_index = seq_index * Tmax + t_in_seq
    last_index = query_start + q_lens - 1
    parts = [ids[None], pos[None], slot, tables, q_index, q_pos, out_index, last_index, seq_index, query_start]
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
        self.rows: list[tuple[list[int], int, int, int, array.array]] = []  # (table, len, last, nb, row)

    def row(self, b: int, table: list[int], nb: int, scratch_block: int) -> array.array:
        key = (len(table), table[-1] if table else -1, nb)
        if b < len(self.rows) and self.rows[b][0] is table and self.rows[b][1:4] == key:
            return self.rows[b][4]
        row = array.array("q", table)
        row.extend(array.array("q", [scratch_block]) * (nb - len(table)))
        entry = (table, *key, row)
        if b < len(self.rows):
            self.rows[b] = entry
        else:
            self.rows.append(entry)
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
    tables = array.array("q")  # (Bp * nb,); array.extend of an array is a memory copy
    for b, s in enumerate(seqs):
        tables.extend(rows.row(b, s.block_table, nb, scratch_block))
    tables.extend(array.array("q", [scratch_block]) * (nb * (Bp - B)))
    slot = [tables[b * nb + p // bs] * bs + p % bs for b, p in enumerate(pos)]  # (Bp,)
    ids = list(token_ids) + [0] * (Bp - B)
    ar = list(range(Bp))
    # Field order of StepMetadata: input_ids, positions, slot_mapping, block_tables, q_index,
    # q_pos, out_index, last_index, seq_index, query_start. Through array.array: torch.tensor(list)
    # converts ints one by one, several times slower.
    flat = array.array("q", ids + pos + slot)
    flat.extend(tables)
    flat.extend(ar + pos + ar + ar + ar + ar)
    flat = torch.frombuffer(flat, dtype=torch.int64)
    shapes = [(1, Bp), (1, Bp), (Bp,), (Bp, nb), (Bp, 1), (Bp, 1), (Bp,), (Bp,), (Bp,), (Bp,)]
    return flat, shapes


def build_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                   device) -> StepMetadata:
    flat, shapes = host_metadata(seqs, token_ids, block_size, scratch_block)
    return StepMetadata.from_flat(flat.to(device), shapes)


class PagedBatch:
    """The cache object the model receives for one forward pass of the paged engine.

    It stores and indexes; the layer does the math (`attend_kv` in architectures/common/attention.py).
    `read` returns, per layer, one of three views of the same blocks:
    attention="gather": each sequence's blocks gathered into a padded batch, with the packing
    maps and the step's mask, for any step on any device;
    "triton": decode-only steps (one new token per sequence) get a view whose `kernel` is the
    Triton kernel of inference/triton_paged_attention.py, which reads K/V in place; other steps
    (prefills, mixed) gather;
    "reference": a `kernel` that runs `paged_attention_reference`, the slow oracle, for tests.
    Quantized blocks are dequantized by the gather and by the reference as they read them, and by
    the kernel in its loop; int4 decode steps run their own kernel (inference/triton_kivi_attention.py),
    which reads each sequence's residual as well.
    """

    def __init__(self, pool: PagedKVPool, meta: StepMetadata, attention: str = "gather",
                 seqs: list[ScheduledSeq] | None = None):
        if attention not in ("gather", "triton", "reference"):
            raise ValueError(f"attention must be 'gather', 'triton' or 'reference', got {attention!r}")
        if attention == "reference" and seqs is None:
            raise ValueError("the reference attention walks the block tables: pass seqs")
        self.pool, self.meta, self.attention, self.seqs = pool, meta, attention, seqs
        # Tmax == 1: every sequence brings exactly one token, a decode-only step (known from a shape,
        # so deciding costs no host synchronisation and a CUDA graph captures one branch).
        self.decode_kernel = attention == "triton" and meta.q_index.shape[1] == 1 and pool.format.kernel_reads
        self.mask = self.context_lens = self.kernel_tables = None
        self.state_mask = None  # (B, Tmax, Tmax) bool: the state layers' view of which packed tokens are real
        self.gathered: dict[int, dict[str, torch.Tensor]] = {}  # layer -> the states handed out this pass
        self._groups = None  # int4: the step's index tensors for writing blocks and residuals (`_group_index`)
        if pool.states or pool.residual:
            if seqs is None or any(s.state_slot < 0 for s in seqs):
                what = "per-sequence state" if pool.states else "an int4 cache (its residual)"
                raise ValueError(f"a model with {what} needs every scheduled sequence's state slot (seqs)")
            self.slots = torch.tensor([s.state_slot for s in seqs], device=meta.input_ids.device)  # (B,)
            self.fresh = torch.tensor([s.start == 0 for s in seqs], device=meta.input_ids.device)  # (B,)

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        N = self.meta.positions.shape[1]
        if batch_size != 1 or seq_len != N:
            raise ValueError(f"the paged cache expects the step's {N} tokens packed as input_ids of shape (1, {N}), "
                             f"got ({batch_size}, {seq_len})")
        # Built here, once per forward pass, so that every layer shares it (and a CUDA graph captures it).
        if self.decode_kernel:
            self.context_lens = self.meta.positions[0] + 1  # (B,): the new token sees itself and all before it
            self.kernel_tables = self.meta.block_tables.to(torch.int32)  # what the kernel reads fastest, once a step
        elif self.attention != "reference":  # the gather path (a "triton" step that is not decode-only too)
            # The additive mask SDPA would otherwise rebuild from a boolean one in every layer.
            allowed = attention_mask(self.meta.q_pos, self.meta.block_tables.shape[1] * self.pool.block_size)
            self.mask = torch.zeros(allowed.shape, dtype=self.pool.format.compute_dtype, device=allowed.device)
            self.mask.masked_fill_(~allowed, float("-inf"))  # (B, Tmax, S): 0 where visible, -inf elsewhere
        return self.meta.positions

    def max_length(self) -> None:
        return None

    def write(self, layer: int, **new: torch.Tensor) -> None:
        # each new tensor: (1, N, *shape), token n goes to flat slot slot_mapping[n] (block * bs + offset)
        if self.pool.residual:
            return self._write_groups(layer, new)
        stored, fmt, shapes = self.pool.layer(layer), self.pool.format, self.pool.shapes[layer]
        for name, t in new.items():
            if fmt.name in ("int8", "fp8") and self._fused_write(name, t[0], stored):
                continue
            for part, codes in fmt.encode(name, t[0], len(shapes[name])).items():  # plain: {name: t[0]}
                cache = stored[part]  # (num_blocks + 1, bs, *part)
                _index_copy(cache.view(-1, *cache.shape[2:]), self.meta.slot_mapping, codes)

    def _fused_write(self, name: str, x: torch.Tensor, stored: dict[str, torch.Tensor]) -> bool:
        """int8 / fp8 on a GPU: quantize and store x (N, *shape) in one Triton kernel
        (inference/triton_kv_write.py), the same numbers as `encode` + index copies; False where it cannot run."""
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, K, d); a latent row is one head
        codes, scales = stored[name], stored[f"{name}_scale"]
        codes = codes.view(-1, x.shape[1], x.shape[2])  # (num_slots, K, d)
        scales = scales.view(-1, x.shape[1], 1)
        if fused_write_reason(x, codes, scales) is not None:
            return False
        write_quantized_rows(x, codes, scales, self.meta.slot_mapping)
        return True

    def _parts(self, layer: int) -> dict[str, list[str]]:
        """{name: its stored parts} of one layer: {"k": ["k", "k_scale"], ...} (plain: {"k": ["k"], ...})."""
        fmt = self.pool.format
        return {name: list(fmt.group_parts(name, shape)) for name, shape in self.pool.shapes[layer].items()}

    def read(self, layer: int) -> CacheView:
        stored, m, fmt = self.pool.layer(layer), self.meta, self.pool.format
        if layer in self.pool.states:
            return self._state_view()
        if self.decode_kernel:  # N == B: query b is sequence b's one new token
            from inference.triton_paged_attention import paged_decode_attention  # imports triton: GPU only

            if "latent" in stored:  # MLA: every head attends over the one latent row, its values a prefix of it
                from inference.triton_paged_attention import paged_latent_decode_attention
                value_width = self.pool.specs[layer].value_width

                def kernel(q, scale):  # q: (1, B, H, d_c + d_r) -> (1, B, H, d_c)
                    return paged_latent_decode_attention(q[0], stored["latent"], value_width, self.kernel_tables,
                                                         self.context_lens, scale=scale)[None]
                return CacheView(kernel=kernel)

            if self.pool.residual:  # int4: 4-bit blocks, and each sequence's newest tokens in its residual
                from inference.triton_kivi_attention import paged_int4_decode_attention
                residual = self.pool.residual[layer]

                def kernel(q, scale):  # q: (1, B, H, d) -> (1, B, H, d)
                    return paged_int4_decode_attention(
                        q[0], stored["k"], stored["k_scale"], stored["k_zero"], stored["v"], stored["v_scale"],
                        stored["v_zero"], residual["k"], residual["v"], self.slots, self.kernel_tables,
                        self.context_lens, scale=scale)[None]
                return CacheView(kernel=kernel)

            def kernel(q, scale):  # q: (1, B, H, d) -> (1, B, H, dv)
                return paged_decode_attention(q[0], stored["k"], stored["v"], self.kernel_tables, self.context_lens,
                                              scale=scale, k_scale=stored.get("k_scale"),
                                              v_scale=stored.get("v_scale"), splits=None)[None]
            return CacheView(kernel=kernel)
        if self.attention == "reference":
            kv = self._dequantized_pool(layer) if fmt.quantized else stored

            def kernel(q, scale):
                return paged_attention_reference(q[0], kv["k"], kv["v"], [s.block_table for s in self.seqs],
                                                 [s.end for s in self.seqs], [s.end - s.start for s in self.seqs],
                                                 scale=scale)[None]
            return CacheView(kernel=kernel)
        B, Tmax = m.q_index.shape
        tensors = {}
        for name, parts in self._parts(layer).items():
            gathered = {part: gather_blocks(stored[part], m.block_tables) for part in parts}  # (B, S / G, *part)
            tensors[name] = fmt.decode(name, gathered, len(self.pool.shapes[layer][name]))  # (B, S, *shape)
            if self.pool.residual:
                tensors[name] = self._lay_residual(tensors[name], self.pool.residual[layer][name])
        return CacheView(
            tensors=tensors,
            mask=self.mask,
            pack=lambda x: x[0][m.q_index],  # (1, N, ...) -> (B, Tmax, ...)
            unpack=lambda y: y.reshape(B * Tmax, *y.shape[2:])[m.out_index][None],  # -> (1, N, ...)
        )

    def _dequantized_pool(self, layer: int) -> dict[str, torch.Tensor]:
        """The reference's view: every block of the layer dequantized, {name: (num_blocks + 1, bs, *shape)}, with
        each scheduled sequence's residual (int4) in the block it belongs to."""
        stored, fmt, bs = self.pool.layer(layer), self.pool.format, self.pool.block_size
        out = {name: fmt.decode(name, {part: stored[part] for part in parts}, len(self.pool.shapes[layer][name]))
               for name, parts in self._parts(layer).items()}
        for name, res in self.pool.residual.get(layer, {}).items():
            for s in self.seqs:
                if s.end % bs:
                    out[name][s.block_table[s.end // bs]] = res[s.state_slot]
        return out

    # ---- int4: blocks fill in full precision, then are quantized whole ----------------------------

    def _group_index(self) -> dict[str, torch.Tensor]:
        """Index tensors shared by every layer's int4 write and read, built on the host once per step.

        Sequence b computes positions start .. end - 1; its residual holds positions g0 * bs .. start - 1,
        g0 = start // bs. Its work row, W blocks long, holds positions g0 * bs on: the residual, then the new
        tokens. Its first `full` blocks are complete after the step and are quantized into their blocks;
        block `full` of the row, partial or empty, becomes the new residual."""
        if self._groups is None:
            bs, dev = self.pool.block_size, self.meta.input_ids.device
            start = torch.tensor([s.start for s in self.seqs])  # (B,)
            end = torch.tensor([s.end for s in self.seqs])
            first = torch.cumsum(end - start, 0) - (end - start)  # packed index of each sequence's first new token
            g0, r0 = start // bs, start % bs
            full = end // bs - g0  # (B,) blocks of the row that are complete
            W = int(full.max()) + 1
            w = torch.arange(W * bs)  # (W * bs,) slot of the work row
            from_residual = w[None] < r0[:, None]  # (B, W * bs)
            new_index = (first[:, None] + w[None] - r0[:, None]).clamp(0, int(end.sum() - start.sum()) - 1)
            j = torch.arange(W)
            nb = max(len(s.block_table) for s in self.seqs)
            tables = torch.tensor([s.block_table + [self.pool.scratch_block] * (nb - len(s.block_table))
                                   for s in self.seqs])  # (B, nb)
            block = tables.gather(1, (g0[:, None] + j[None]).clamp(max=nb - 1))  # (B, W)
            block = torch.where(j[None] < full[:, None], block, self.pool.scratch_block)  # incomplete: to scratch
            partial = end % bs != 0
            self._groups = {name: t.to(dev) for name, t in dict(
                from_residual=from_residual, new_index=new_index, block=block.reshape(-1),
                residual_src=full[:, None] * bs + torch.arange(bs)[None],  # (B, bs): row slots of the new residual
                last_block=(end // bs).clamp(max=nb - 1), partial=partial).items()}
            self._groups["fills_a_block"] = bool(full.max() > 0)  # host-side: most decode steps fill none
        return self._groups

    def _write_groups(self, layer: int, new: dict[str, torch.Tensor]) -> None:
        ix, fmt, bs = self._group_index(), self.pool.format, self.pool.block_size
        stored = self.pool.layer(layer)
        B = len(self.seqs)
        for name, t in new.items():
            residual = self.pool.residual[layer][name]  # (slots, bs, *shape)
            shape = t.shape[2:]
            held = residual[self.slots]  # (B, bs, *shape)
            Wbs = ix["from_residual"].shape[1]
            from_res = held[:, torch.arange(Wbs, device=t.device).clamp(max=bs - 1)]  # (B, W * bs, *shape)
            row = torch.where(ix["from_residual"].view(B, Wbs, *[1] * len(shape)), from_res, t[0][ix["new_index"]])
            # No block complete (most decode steps): every group would go to the scratch block, so skip encoding.
            for part, codes in (fmt.encode(name, row, len(shape)) if ix["fills_a_block"] else {}).items():
                cache = stored[part]  # (num_blocks + 1, 1, *part)
                _index_copy(cache.view(-1, *cache.shape[2:]), ix["block"], codes.flatten(0, 1))
            rows = torch.arange(B, device=t.device)[:, None]
            residual.index_copy_(0, self.slots, row[rows, ix["residual_src"]])

    def _lay_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x: (B, S, *shape) the gathered blocks, dequantized; each sequence whose last block is unfilled gets
        that block's tokens from its residual."""
        ix, bs = self._group_index(), self.pool.block_size
        B = x.shape[0]
        blocks = x.view(B, -1, bs, *x.shape[2:])  # (B, nb, bs, *shape)
        rows = torch.arange(B, device=x.device)
        now = blocks[rows, ix["last_block"]]  # (B, bs, *shape)
        keep = ix["partial"].view(B, *[1] * (now.dim() - 1))
        blocks[rows, ix["last_block"]] = torch.where(keep, residual[self.slots], now)
        return x

    def _state_view(self) -> CacheView:
        """For a layer with per-sequence state: no stored tensors, only the layout of the step's tokens.
        pack: (1, N, ...) -> (B, Tmax, ...), one row per sequence, right-padded; mask[b, t, s]: query t of
        row b sees token s of its row if s <= t and s is one of the row's q_len_b real tokens."""
        m = self.meta
        B, Tmax = m.q_index.shape
        if self.state_mask is None:
            q_len = m.last_index - m.query_start + 1  # (B,)
            s = torch.arange(Tmax, device=q_len.device)
            self.state_mask = (s[None, :] <= s[:, None])[None] & (s < q_len[:, None])[:, None, :]  # (B, Tmax, Tmax)
        mask = self.state_mask
        if Tmax == 1:  # decode-only: one real token per row
            mask = None
        return CacheView(mask=mask, pack=lambda x: x[0][m.q_index],
                         unpack=lambda y: y.reshape(B * Tmax, *y.shape[2:])[m.out_index][None])

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        """{name: (B, *shape)}: the step's sequences' states of `layer`, gathered from their slots (zero for a
        sequence computed from its first token); the layer updates them in place, `advance` writes them back."""
        if layer not in self.pool.states:
            raise ValueError(f"layer {layer} declares no per-sequence state")
        out = {}
        for name, t in self.pool.states[layer].items():
            g = t[self.slots]  # (B, *shape), a copy
            out[name] = g.masked_fill_(self.fresh.view(-1, *[1] * (g.dim() - 1)), 0)
        self.gathered[layer] = out
        return out

    def advance(self, seq_len: int) -> None:
        # Blocks need nothing (the block manager did the bookkeeping before the pass); states go back to their slots.
        for layer, gathered in self.gathered.items():
            for name, t in gathered.items():
                self.pool.states[layer][name].index_copy_(0, self.slots, t)
        self.gathered = {}

"""The paged KV pool: every layer's cache blocks, allocated once, and the per-sequence slots beside them.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180). The pool only holds tensors; which block belongs to which
sequence is the block manager's bookkeeping (inference/block_manager.py), what one step reads and
writes is in inference/step_metadata.py, and the cache object a forward pass sees is `PagedBatch`
(inference/paged_cache.py). Its bytes are checked against the memory formula by
tests/inference/test_memory.py and tests/inference/test_quantized_kv.py.

The pool holds whatever the layers declare per token (K and V; DeepSeek's latent vector), so an
architecture whose attention caches something else needs no change here. Layers that declare a
per-sequence `StateSpec` (Mamba-2's convolution window and SSM state) get `num_state_slots` fixed
slots instead of blocks, one per running sequence (inference/block_manager.py's `StateSlots`).

Block `num_blocks` of the pool (one past the blocks the block manager hands out) is scratch:
padding rows of a CUDA-graph batch write there, so they never touch a sequence's blocks.

Sliding-window layers (inference/kv_groups.py): the attention layers are grouped by window into
groups of g layers, each group with its own block table per sequence, all over these blocks. A block is
then g pages, one per slot of a group: one stacked tensor per stored name of (g, num_blocks + 1, bs, ...),
whose slot j serves layer j of every group, so a block costs g layers' bytes, not every layer's.

Quantized K/V (`kv_dtype`, inference/quantized_kv.py): the blocks hold codes and their scales
(int8, fp8: k, k_scale, v, v_scale, each (num_blocks + 1, bs, K, ...)). int4 (KIVI) quantizes a
block's keys per channel over its bs tokens, so a block is quantized only when it fills; until then
its tokens wait in full precision in the sequence's *residual*, one more per-sequence slot
(inference/kivi_residual.py keeps it).
"""

from __future__ import annotations

import torch

from architectures.common.cache import CacheSpec, bytes_per_sequence
from inference.kv_groups import TableGroup, table_groups
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
        self.table_groups: list[TableGroup] = table_groups(specs)  # one block table per sequence in each
        self.group_of = {layer: g for g, grp in enumerate(self.table_groups) for layer in grp.layers}
        if fmt.residual and len(self.table_groups) > 1:
            raise ValueError("kv_dtype='int4' keeps each sequence's unfilled block in a residual that follows one block "
                             "table, and sliding-window layers keep one table per group of layers; use kv_dtype='int8' "
                             "or 'fp8' (or the model's dtype) with sliding windows")
        per_block = block_size // fmt.token_group  # quantization groups per block: bs, or 1 for int4
        self.stacks: list[dict[str, torch.Tensor]] = []  # per stack: {part: (entries, num_blocks + 1, per_block, *part)}
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}  # layer -> {name: per-token shape}
        self._where: dict[int, tuple[int, int]] = {}  # layer -> (stack, entry within the stack)
        for g, (spec, entries) in enumerate(_stacks(specs, self.table_groups)):
            self.stacks.append({part: torch.zeros(len(entries), num_blocks + 1, per_block, *shape, dtype=dt,
                                                  device=device)
                                for name, full in spec.per_token.items()
                                for part, (shape, dt) in fmt.group_parts(name, full).items()})
            self._where.update({layer: (g, j) for j, layers in enumerate(entries) for layer in layers})
            self.shapes.update({layer: dict(spec.per_token) for layers in entries for layer in layers})
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
                  kv_dtype: str | None = None) -> PagedKVPool:
        p = next(model.parameters())
        return cls(model.cache_specs(), num_blocks, block_size, p.dtype, p.device, num_state_slots, kv_dtype)

    @staticmethod
    def bytes_per_block(model, block_size: int, kv_dtype: str | None = None) -> int:
        """Bytes one block costs over all layers: block_size x the model's bytes per cached token, scales included."""
        p = next(model.parameters())
        fmt = PagedKVPool.block_format(kv_dtype, p.dtype, p.device, block_size)
        return block_size // fmt.token_group * bytes_per_group(block_specs(model.cache_specs()), fmt)

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


def _stacks(specs: list[CacheSpec | None], groups: list[TableGroup]) -> list[tuple[CacheSpec, list[list[int]]]]:
    """How the pool stacks its tensors: [(spec giving the shapes, entries)], entry j of a stack serving the
    layers entries[j]. One table group (no windows): a stack per distinct spec, an entry per layer. Several
    (windows): one stack of g entries, entry j serving layer j of every group (every layer caches the same
    shapes, `table_groups` checks)."""
    if len(groups) > 1:
        entries = [[grp.layers[j] for grp in groups] for j in range(len(groups[0].layers))]
        return [(specs[groups[0].layers[0]], entries)]
    by_spec: dict[CacheSpec, list[list[int]]] = {}
    for i, spec in enumerate(specs):
        if spec is not None and spec.per_token:
            by_spec.setdefault(spec, []).append([i])
    return list(by_spec.items())


def block_specs(specs: list[CacheSpec | None]) -> list[CacheSpec | None]:
    """The specs of the layers one block holds pages of: every layer that keeps something per token, or, with
    sliding windows, the g layers of one table group (inference/kv_groups.py)."""
    groups = table_groups(specs)
    return specs if len(groups) == 1 else [specs[i] for i in groups[0].layers]


def index_copy(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i], how tokens are written into the pool's blocks (inference/paged_cache.py,
    inference/kivi_residual.py). fp8 codes are copied as their bytes: torch's CPU index_copy_ has no fp8 kernel."""
    if dst.element_size() == 1 and dst.dtype != torch.int8:
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    dst.index_copy_(0, index, src)

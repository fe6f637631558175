"""The paged KV cache on the model's side: `PagedBatch`, the cache object that one forward pass of the
engine hands to the model.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180). Tested against the naive cache and against no cache
(tests/inference/test_engine.py), and its attention against a reference
(tests/inference/test_paged_attention.py).

A forward pass of the engine packs every scheduled sequence into one row (inference/step_metadata.py):
input_ids (1, N) holds, sequence after sequence, the tokens whose K/V are not yet in the cache. The
model does not know; it sees a cache that answers the same calls as `NaiveKVCache` (the `Cache`
protocol of architectures/common/cache.py), over the blocks of the pool (inference/kv_pool.py):
    positions(1, N)    each token's position within its own sequence, (1, N)
    max_length()       None: lengths are per sequence, and the engine checked them at submission
    write(l, k=, v=)   this step's per-token tensors of layer l into their slots of the pool
    read(l)            a view of each sequence's blocks (gathered, or read in place by a kernel)
    state(l)           the step's sequences' per-sequence states of layer l, gathered from their slots
    advance(N)         nothing for blocks (the block manager did the bookkeeping before the pass);
                       the states the layers updated are scattered back to their slots
A layer with a per-sequence state (Mamba-2) finds its sequences' tokens in the packed row through
`read`: a view with no tensors whose `pack` gives each sequence a row (B, Tmax), right-padded, and
whose mask (B, Tmax, Tmax) lets the row's last query see exactly the row's real tokens.

Sliding windows and soft-caps (`KVSpec.window`, `KVSpec.softcap`): each layer writes to and reads through
its group's block tables (inference/kv_groups.py); the gather masks each query's keys to its layer's
window (one mask per distinct window per step, shared by the layers of that window), the reference and
the Triton decode kernel are given the window and start at its first position, and both apply the
layer's soft-cap (the gather leaves it to `attend_kv`, which the layer passes it to).

Quantized K/V (inference/quantized_kv.py): `write` quantizes, the gather dequantizes what it gathered,
and the Triton decode kernels read codes and scales in place. int4 (KIVI) quantizes a block only when
it fills; its unfilled blocks wait in each sequence's residual (inference/kivi_residual.py), which
`read` lays over the block it belongs to.
"""

from __future__ import annotations

import torch

from architectures.common.cache import CacheView
from inference.kivi_residual import KiviResidual
from inference.kv_pool import PagedKVPool, index_copy
from inference.paged_attention import attention_mask, gather_blocks, paged_attention_reference
from inference.step_metadata import ScheduledSeq, StepMetadata
from inference.triton_kv_write import fused_write_reason, write_quantized_rows


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
        self.context_lens = self.kernel_tables = None
        self.masks: dict[int | None, torch.Tensor] = {}  # window -> the gather's additive mask of this step
        self.state_mask = None  # (B, Tmax, Tmax) bool: the state layers' view of which packed tokens are real
        self.gathered: dict[int, dict[str, torch.Tensor]] = {}  # layer -> the states handed out this pass
        self.kivi: KiviResidual | None = None  # int4: the step's block writes and residual reads
        if pool.states or pool.residual:
            if seqs is None or any(s.state_slot < 0 for s in seqs):
                what = "per-sequence state" if pool.states else "an int4 cache (its residual)"
                raise ValueError(f"a model with {what} needs every scheduled sequence's state slot (seqs)")
            self.slots = torch.tensor([s.state_slot for s in seqs], device=meta.input_ids.device)  # (B,)
            self.fresh = torch.tensor([s.start == 0 for s in seqs], device=meta.input_ids.device)  # (B,)
            if pool.residual:
                self.kivi = KiviResidual(pool, seqs, self.slots, meta.input_ids.device)

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        N = self.meta.positions.shape[1]
        if batch_size != 1 or seq_len != N:
            raise ValueError(f"the paged cache expects the step's {N} tokens packed as input_ids of shape (1, {N}), "
                             f"got ({batch_size}, {seq_len})")
        # Built here, once per forward pass, so that every layer shares it (and a CUDA graph captures it).
        if self.decode_kernel:
            self.context_lens = self.meta.positions[0] + 1  # (B,): the new token sees itself and all before it
            # what the kernel reads fastest, once a step (one table per group of layers)
            self.kernel_tables = [self.meta.tables(g).to(torch.int32) for g in range(len(self.pool.table_groups))]
        elif self.attention != "reference":  # the gather path (a "triton" step that is not decode-only too)
            # The additive masks SDPA would otherwise rebuild from a boolean one in every layer: one per window.
            for window in dict.fromkeys(g.window for g in self.pool.table_groups):
                allowed = attention_mask(self.meta.q_pos, self.meta.block_tables.shape[1] * self.pool.block_size,
                                         window)
                mask = torch.zeros(allowed.shape, dtype=self.pool.format.compute_dtype, device=allowed.device)
                self.masks[window] = mask.masked_fill_(~allowed, float("-inf"))  # (B, Tmax, S): 0 visible, -inf not
        return self.meta.positions

    def max_length(self) -> None:
        return None

    def _group(self, layer: int) -> int:
        """The table group (inference/kv_groups.py) whose blocks hold this layer's K/V."""
        return self.pool.group_of[layer]

    def _window_softcap(self, layer: int) -> tuple[int | None, float | None]:
        spec = self.pool.specs[layer]
        return getattr(spec, "window", None), getattr(spec, "softcap", None)

    # ---- write: this step's tokens into their slots -------------------------------------------

    def write(self, layer: int, **new: torch.Tensor) -> None:
        # each new tensor: (1, N, *shape), token n goes to flat slot slot_mapping[n] (block * bs + offset)
        if self.kivi is not None:
            return self.kivi.write(layer, new)
        stored, fmt, shapes = self.pool.layer(layer), self.pool.format, self.pool.shapes[layer]
        slots = self.meta.slots(self._group(layer))  # (N,)
        for name, t in new.items():
            if fmt.name in ("int8", "fp8") and self._fused_write(name, t[0], stored, slots):
                continue
            for part, codes in fmt.encode(name, t[0], len(shapes[name])).items():  # plain: {name: t[0]}
                cache = stored[part]  # (num_blocks + 1, bs, *part)
                index_copy(cache.view(-1, *cache.shape[2:]), slots, codes)

    def _fused_write(self, name: str, x: torch.Tensor, stored: dict[str, torch.Tensor], slots: torch.Tensor) -> bool:
        """int8 / fp8 on a GPU: quantize and store x (N, *shape) in one Triton kernel
        (inference/triton_kv_write.py), the same numbers as `encode` + index copies; False where it cannot run."""
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, K, d); a latent row is one head
        codes, scales = stored[name], stored[f"{name}_scale"]
        codes = codes.view(-1, x.shape[1], x.shape[2])  # (num_slots, K, d)
        scales = scales.view(-1, x.shape[1], 1)
        if fused_write_reason(x, codes, scales) is not None:
            return False
        write_quantized_rows(x, codes, scales, slots)
        return True

    # ---- read: one of three views of the blocks, or a state layer's layout --------------------

    def read(self, layer: int) -> CacheView:
        if layer in self.pool.states:
            return self._state_view()
        if self.decode_kernel:  # N == B: query b is sequence b's one new token
            return self._kernel_view(layer)
        if self.attention == "reference":
            return self._reference_view(layer)
        return self._gather_view(layer)

    def _kernel_view(self, layer: int) -> CacheView:
        """A decode-only step: a `kernel` that reads the layer's blocks in place (imports triton: GPU only)."""
        from inference.triton_paged_attention import paged_decode_attention

        stored = self.pool.layer(layer)
        if "latent" in stored:  # MLA: every head attends over the one latent row, its values a prefix of it
            return self._latent_kernel_view(layer, stored)
        if self.kivi is not None:  # int4: 4-bit blocks, and each sequence's newest tokens in its residual
            return self._int4_kernel_view(layer, stored)

        tables, (window, softcap) = self.kernel_tables[self._group(layer)], self._window_softcap(layer)

        def kernel(q, scale):  # q: (1, B, H, d) -> (1, B, H, dv)
            return paged_decode_attention(q[0], stored["k"], stored["v"], tables, self.context_lens,
                                          scale=scale, k_scale=stored.get("k_scale"),
                                          v_scale=stored.get("v_scale"), splits=None, window=window,
                                          softcap=softcap)[None]
        return CacheView(kernel=kernel)

    def _latent_kernel_view(self, layer: int, stored: dict[str, torch.Tensor]) -> CacheView:
        from inference.triton_paged_attention import paged_latent_decode_attention

        value_width = self.pool.specs[layer].value_width

        def kernel(q, scale):  # q: (1, B, H, d_c + d_r) -> (1, B, H, d_c)
            return paged_latent_decode_attention(q[0], stored["latent"], value_width, self.kernel_tables[0],
                                                 self.context_lens, scale=scale)[None]
        return CacheView(kernel=kernel)

    def _int4_kernel_view(self, layer: int, stored: dict[str, torch.Tensor]) -> CacheView:
        from inference.triton_kivi_attention import paged_int4_decode_attention

        residual = self.pool.residual[layer]

        def kernel(q, scale):  # q: (1, B, H, d) -> (1, B, H, d)
            return paged_int4_decode_attention(
                q[0], stored["k"], stored["k_scale"], stored["k_zero"], stored["v"], stored["v_scale"],
                stored["v_zero"], residual["k"], residual["v"], self.slots, self.kernel_tables[0],
                self.context_lens, scale=scale)[None]
        return CacheView(kernel=kernel)

    def _reference_view(self, layer: int) -> CacheView:
        """A `kernel` that walks the block tables one slot at a time (`paged_attention_reference`)."""
        kv = self._dequantized_pool(layer) if self.pool.format.quantized else self.pool.layer(layer)
        g, (window, softcap) = self._group(layer), self._window_softcap(layer)

        def kernel(q, scale):
            return paged_attention_reference(q[0], kv["k"], kv["v"], [s.tables[g] for s in self.seqs],
                                             [s.end for s in self.seqs], [s.end - s.start for s in self.seqs],
                                             scale=scale, window=window, softcap=softcap)[None]
        return CacheView(kernel=kernel)

    def _dequantized_pool(self, layer: int) -> dict[str, torch.Tensor]:
        """The reference's view: every block of the layer dequantized, {name: (num_blocks + 1, bs, *shape)}, with
        each scheduled sequence's residual (int4) in the block it belongs to."""
        stored, fmt = self.pool.layer(layer), self.pool.format
        out = {name: fmt.decode(name, {part: stored[part] for part in parts}, len(self.pool.shapes[layer][name]))
               for name, parts in self._parts(layer).items()}
        if self.kivi is not None:
            self.kivi.lay_over_pool(layer, out)
        return out

    def _gather_view(self, layer: int) -> CacheView:
        """Each sequence's blocks gathered (and dequantized) into a padded batch (B, S, *shape), with the maps
        between the packed row and the batch, and the step's mask."""
        stored, m, fmt = self.pool.layer(layer), self.meta, self.pool.format
        B, Tmax = m.q_index.shape
        group = self._group(layer)
        tables = m.tables(group)  # (B, nb) this layer's group's tables
        tensors = {}
        for name, parts in self._parts(layer).items():
            gathered = {part: gather_blocks(stored[part], tables) for part in parts}  # (B, S / G, *part)
            tensors[name] = fmt.decode(name, gathered, len(self.pool.shapes[layer][name]))  # (B, S, *shape)
            if self.kivi is not None:
                tensors[name] = self.kivi.lay_over_gathered(layer, name, tensors[name])
        return CacheView(
            tensors=tensors,
            mask=self.masks[self.pool.table_groups[group].window],
            pack=lambda x: x[0][m.q_index],  # (1, N, ...) -> (B, Tmax, ...)
            unpack=lambda y: y.reshape(B * Tmax, *y.shape[2:])[m.out_index][None],  # -> (1, N, ...)
        )

    def _parts(self, layer: int) -> dict[str, list[str]]:
        """{name: its stored parts} of one layer: {"k": ["k", "k_scale"], ...} (plain: {"k": ["k"], ...})."""
        fmt = self.pool.format
        return {name: list(fmt.group_parts(name, shape)) for name, shape in self.pool.shapes[layer].items()}

    # ---- per-sequence states (Mamba-2): gathered from their slots, scattered back --------------

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

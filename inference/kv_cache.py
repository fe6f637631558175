"""The naive cache: one contiguous buffer per sequence, layer and stored tensor, reserved up front.

Why a cache: without one, generating token t recomputes keys and values for all t-1
earlier tokens, O(T^2) work per sequence; with one, each step computes K/V for one new
token and attends over the stored ones. The cost is memory: for Llama 3, 2 (K and V) x layers
x kv_heads x head_dim x bytes per token, reserved up front for the longest sequence.

What is stored comes from the layers' declarations (architectures/common/cache.py): a layer
with a `KVSpec` gets K and V buffers of (B, capacity, K, d), one with a `LatentSpec` a latent
buffer of (B, capacity, width), one with a `StateSpec` its fixed-size (B, *shape) state, and a
layer that declares nothing gets nothing. The cache stores and indexes; the layer does its math.

A batch of prompts of different lengths is left-padded to the longest (the way
transformers' `generate` batches): row b starts with pad[b] padding slots that no query
may attend to. Every row then reserves `capacity` slots whatever its own length, and a row
that has finished keeps its slots until the whole batch ends; notes/kv-cache.md measures
that waste and notes/paged-attention.md shows how paging removes it.

It answers the calls of the `Cache` protocol (architectures/common/cache.py): positions,
max_length, write, read, state, advance.

`kv_dtype` stores the per-token tensors quantized (inference/quantized_kv.py): "int8" and "fp8"
keep codes and a scale per token and head, quantized as they are written and dequantized as they are
read; "int4" (KIVI) keeps keys in groups of `group_size` tokens and the newest tokens, until their
group fills, in full precision (`residual`). With left padding, an int4 key group that holds padding
slots takes their keys into its per-channel range, so a padded row's int4 logits differ slightly from
the same prompt alone (the per-token formats are unaffected). Per-sequence state is never quantized.
"""

from __future__ import annotations

import torch

from architectures.common.cache import CacheSpec, CacheView
from inference.quantized_kv import check_int4_shapes, kv_format


class NaiveKVCache:
    def __init__(self, specs: list[CacheSpec | None], batch_size: int, capacity: int, dtype=torch.float32,
                 device="cpu", pad: list[int] | None = None, kv_dtype: str | None = None,
                 group_size: int | None = None):
        self.format = fmt = kv_format(kv_dtype, dtype, device, group_size)
        check_int4_shapes(specs, fmt)
        G = fmt.token_group  # 1 unless int4
        # Per layer, what each per-token tensor is stored as: {name: {part: (shape per group, dtype)}}.
        self.layout = [{name: fmt.group_parts(name, shape) for name, shape in (s.per_token.items() if s else ())}
                       for s in specs]
        self.ndim = [{name: len(shape) for name, shape in (s.per_token.items() if s else ())} for s in specs]
        # Per layer: {part: (B, capacity / G, *part shape)} for per-token tensors (plain: {name: (B, capacity,
        # *shape)}), {name: (B, *shape)} for state, and for int4 {name: (B, G, *shape)} of residual tokens.
        self.tokens = [{part: torch.zeros(batch_size, -(-capacity // G), *shape, dtype=dt, device=device)
                        for parts in layer.values() for part, (shape, dt) in parts.items()} for layer in self.layout]
        self.residual = None if not fmt.residual else [
            {name: torch.zeros(batch_size, G, *shape, dtype=dtype, device=device)
             for name, shape in (s.per_token.items() if s else ())} for s in specs]
        self.states = [{name: torch.zeros(batch_size, *shape, dtype=dtype, device=device)
                        for name, shape in (s.per_sequence.items() if s is not None else ())} for s in specs]
        self.capacity = capacity
        self.length = 0  # slots filled so far (the same for every row of the batch, padding included)
        pad = list(pad) if pad is not None else [0] * batch_size
        if len(pad) != batch_size or min(pad) < 0 or max(pad) >= capacity:
            raise ValueError(f"pad must give 0 <= padding < capacity={capacity} for each of {batch_size} rows, got {pad}")
        self.pad = pad  # left-padding slots of each row
        self._pad = torch.tensor(pad, device=device)  # (B,)
        self._padded = any(pad)
        # A sliding-window layer sees only its last `window` slots: one mask per distinct window per step,
        # built when a layer of that window first reads and shared by every layer with the same window.
        self.windows = [getattr(s, "window", None) for s in specs]
        self._masks: dict[int | None, torch.Tensor | None] = {}  # window -> (T, S) or (B, T, S) of this step
        self._step = (0, "cpu")  # this step's (T, device)
        self._end = 0

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, pad: list[int] | None = None,
                  kv_dtype: str | None = None, group_size: int | None = None) -> "NaiveKVCache":
        p = next(model.parameters())
        return cls(model.cache_specs(), batch_size, capacity, p.dtype, p.device, pad, kv_dtype, group_size)

    def nbytes(self) -> int:
        """Bytes reserved by this cache: for K/V layers, 2 x layers x B x capacity x K x d x element size
        (quantized: codes, scales and zeros, and int4's residual)."""
        return sum(t.numel() * t.element_size() for layer in self.tokens + self.states + (self.residual or [])
                   for t in layer.values())

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        if self.length + seq_len > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} exceeded: {self.length} cached + {seq_len} new tokens; "
                f"create the cache with a larger capacity"
            )
        self._masks, self._step = {}, (seq_len, device)
        self._end = self.length + seq_len  # slots the step's queries may see: 0 .. end - 1
        slots = torch.arange(self.length, self.length + seq_len, device=device)  # (T,)
        if not self._padded:
            return slots.expand(batch_size, seq_len)
        # A row's first real token is at position 0 whatever its padding; padding slots get 0 too
        # (their outputs are never used).
        return (slots[None] - self._pad.to(device)[:, None]).clamp(min=0)  # (B, T)

    def _step_mask(self, T: int, device, window: int | None) -> torch.Tensor | None:
        """Which slots each of this step's T queries sees: None when all (one query, no padding, no window cut)."""
        end = self.length + T
        if T == 1 and not self._padded and (window is None or end <= window):
            return None
        # Query i sits in slot length + i and may see slots 0 .. length + i (the last `window` of them) ...
        i = torch.arange(self.length, end, device=device)[:, None]  # (T, 1)
        j = torch.arange(end, device=device)[None, :]  # (1, S)
        mask = j <= i  # (T, S)
        if window is not None:
            mask = mask & (j > i - window)  # slots and positions differ by the row's padding, so distances agree
        if self._padded:
            # ... except its row's padding. A padding query still sees itself, so that no row
            # of the softmax is all -inf (which would give NaN, and NaN * 0 is still NaN).
            real = j[None] >= self._pad.to(device)[:, None, None]  # (B, 1, S)
            mask = (mask[None] & real) | (j == i)[None]  # (B, T, S)
        return mask

    def mask(self, layer: int) -> torch.Tensor | None:
        """This step's mask for `layer`, shared by every layer with the same window."""
        window = self.windows[layer]
        if window not in self._masks:
            self._masks[window] = self._step_mask(*self._step, window)
        return self._masks[window]

    def max_length(self) -> int:
        return self.length

    def write(self, layer: int, **new: torch.Tensor) -> None:
        # each new tensor: (B, T, *shape), stored in slots length .. length + T - 1
        if self.residual is not None:
            return self._write_groups(layer, new)
        stored, L = self.tokens[layer], self.length
        for name, t in new.items():
            for part, codes in self.format.encode(name, t, self.ndim[layer][name]).items():
                stored[part][:, L:L + t.shape[1]] = codes

    def _write_groups(self, layer: int, new: dict[str, torch.Tensor]) -> None:
        """int4: the residual tokens and the new ones, in order; every group of G that fills is quantized
        into its group slot, the rest (fewer than G) becomes the residual."""
        G, L = self.format.token_group, self.length
        for name, t in new.items():
            res = self.residual[layer][name]  # (B, G, *shape)
            pending = torch.cat([res[:, :L % G], t], 1)  # (B, L % G + T, *shape), from slot L - L % G on
            full = pending.shape[1] // G
            if full:
                g0 = L // G  # the group slot of the first full group
                for part, codes in self.format.encode(name, pending[:, :full * G], self.ndim[layer][name]).items():
                    self.tokens[layer][part][:, g0:g0 + full] = codes
            rest = pending[:, full * G:]
            res[:, :rest.shape[1]] = rest

    def read(self, layer: int) -> CacheView:
        """Slots 0 .. end - 1 of every per-token tensor, (B, S, *shape), dequantized to the model's dtype."""
        fmt, end, stored = self.format, self._end, self.tokens[layer]
        G = fmt.token_group
        out = {}
        for name, parts in self.layout[layer].items():
            if self.residual is None:
                out[name] = fmt.decode(name, {part: stored[part][:, :end] for part in parts}, self.ndim[layer][name])
                continue
            # int4: the full groups, dequantized, then the residual tokens as they are
            full = [fmt.decode(name, {part: stored[part][:, :end // G] for part in parts}, self.ndim[layer][name])
                    ] if end >= G else []
            out[name] = torch.cat(full + [self.residual[layer][name][:, :end % G]], 1)  # (B, end, *shape)
        return CacheView(out, self.mask(layer))

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        return self.states[layer]

    def advance(self, seq_len: int) -> None:
        self.length += seq_len

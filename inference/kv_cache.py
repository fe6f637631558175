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
"""

from __future__ import annotations

import torch

from architectures.common.cache import CacheSpec, CacheView


class NaiveKVCache:
    def __init__(self, specs: list[CacheSpec | None], batch_size: int, capacity: int, dtype=torch.float32,
                 device="cpu", pad: list[int] | None = None):
        # Per layer: {name: (B, capacity, *shape)} for per-token tensors, {name: (B, *shape)} for state.
        self.tokens = [{name: torch.zeros(batch_size, capacity, *shape, dtype=dtype, device=device)
                        for name, shape in (s.per_token.items() if s is not None else ())} for s in specs]
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
        self._mask = None  # (T, S) or (B, T, S) of the current step, built once and shared by every layer
        self._end = 0

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, pad: list[int] | None = None) -> "NaiveKVCache":
        p = next(model.parameters())
        return cls(model.cache_specs(), batch_size, capacity, p.dtype, p.device, pad)

    def nbytes(self) -> int:
        """Bytes reserved by this cache: for K/V layers, 2 x layers x B x capacity x K x d x element size."""
        return sum(t.numel() * t.element_size() for layer in self.tokens + self.states for t in layer.values())

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        if self.length + seq_len > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} exceeded: {self.length} cached + {seq_len} new tokens; "
                f"create the cache with a larger capacity"
            )
        self._mask = self._step_mask(seq_len, device)
        self._end = self.length + seq_len  # slots the step's queries may see: 0 .. end - 1
        slots = torch.arange(self.length, self.length + seq_len, device=device)  # (T,)
        if not self._padded:
            return slots.expand(batch_size, seq_len)
        # A row's first real token is at position 0 whatever its padding; padding slots get 0 too
        # (their outputs are never used).
        return (slots[None] - self._pad.to(device)[:, None]).clamp(min=0)  # (B, T)

    def _step_mask(self, T: int, device) -> torch.Tensor | None:
        """Which slots each of this step's T queries sees: None when all (one query, no padding)."""
        end = self.length + T
        if T == 1 and not self._padded:
            return None
        # Query i sits in slot length + i and may see slots 0 .. length + i ...
        i = torch.arange(self.length, end, device=device)[:, None]  # (T, 1)
        j = torch.arange(end, device=device)[None, :]  # (1, S)
        mask = j <= i  # (T, S)
        if self._padded:
            # ... except its row's padding. A padding query still sees itself, so that no row
            # of the softmax is all -inf (which would give NaN, and NaN * 0 is still NaN).
            real = j[None] >= self._pad.to(device)[:, None, None]  # (B, 1, S)
            mask = (mask[None] & real) | (j == i)[None]  # (B, T, S)
        return mask

    def max_length(self) -> int:
        return self.length

    def write(self, layer: int, **new: torch.Tensor) -> None:
        # each new tensor: (B, T, *shape), stored in slots length .. length + T - 1
        for name, t in new.items():
            self.tokens[layer][name][:, self.length:self.length + t.shape[1]] = t

    def read(self, layer: int) -> CacheView:
        return CacheView({name: buf[:, :self._end] for name, buf in self.tokens[layer].items()},  # (B, S, ...)
                         self._mask)

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        return self.states[layer]

    def advance(self, seq_len: int) -> None:
        self.length += seq_len

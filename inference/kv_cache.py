"""The naive KV cache: one contiguous (K, capacity, d) buffer per sequence and layer.

Why a cache: without one, generating token t recomputes keys and values for all t-1
earlier tokens, O(T^2) work per sequence; with one, each step computes K/V for one new
token and attends over the stored ones. The cost is memory: 2 (K and V) x layers x
kv_heads x head_dim x bytes per token, reserved up front for the longest sequence.

A batch of prompts of different lengths is left-padded to the longest (the way
transformers' `generate` batches): row b starts with pad[b] padding slots that no query
may attend to. Every row then reserves `capacity` slots whatever its own length, and a row
that has finished keeps its slots until the whole batch ends; notes/kv-cache.md measures
that waste and notes/paged-attention.md shows how paging removes it.

The model talks to any cache through four calls, so a paged cache can replace this one
without touching the model:
    positions(B, T, device) -> (B, T) absolute positions of the incoming tokens
    max_length()            -> tokens already stored for the longest sequence, or None for a
                               cache that packs several sequences into one row and checks
                               their lengths itself (inference/paged_cache.py)
    attend(layer, q, k, v)  -> stores k, v for this layer and returns attention output
    advance(T)              -> called by the model after its last layer
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NaiveKVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype=torch.float32, device="cpu", pad: list[int] | None = None):
        shape = (batch_size, num_kv_heads, capacity, head_dim)  # (B, K, capacity, d)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # slots filled so far (the same for every row of the batch, padding included)
        pad = list(pad) if pad is not None else [0] * batch_size
        if len(pad) != batch_size or min(pad) < 0 or max(pad) >= capacity:
            raise ValueError(f"pad must give 0 <= padding < capacity={capacity} for each of {batch_size} rows, got {pad}")
        self.pad = pad  # left-padding slots of each row
        self._pad = torch.tensor(pad, device=device)  # (B,)
        self._padded = any(pad)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, pad: list[int] | None = None) -> "NaiveKVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, capacity, p.dtype,
                   p.device, pad)

    def nbytes(self) -> int:
        """Bytes reserved by this cache: 2 x layers x B x K x capacity x d x element size."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        if self.length + seq_len > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} exceeded: {self.length} cached + {seq_len} new tokens; "
                f"create the cache with a larger capacity"
            )
        slots = torch.arange(self.length, self.length + seq_len, device=device)  # (T,)
        if not self._padded:
            return slots.expand(batch_size, seq_len)
        # A row's first real token is at position 0 whatever its padding; padding slots get 0 too
        # (their outputs are never used).
        return (slots[None] - self._pad.to(device)[:, None]).clamp(min=0)  # (B, T)

    def max_length(self) -> int:
        return self.length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, T, d); k, v: (B, K, T, d)
        T, end = q.shape[2], self.length + q.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, K, S, d), S = end
        mask = None
        if T > 1 or self._padded:
            # Query i sits in slot length + i and may see slots 0 .. length + i ...
            i = torch.arange(self.length, end, device=q.device)[:, None]  # (T, 1)
            j = torch.arange(end, device=q.device)[None, :]  # (1, S)
            mask = j <= i  # (T, S)
            if self._padded:
                # ... except its row's padding. A padding query still sees itself, so that no row
                # of the softmax is all -inf (which would give NaN, and NaN * 0 is still NaN).
                real = j[None] >= self._pad.to(q.device)[:, None, None]  # (B, 1, S)
                mask = ((mask[None] & real) | (j == i)[None])[:, None]  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def advance(self, seq_len: int) -> None:
        self.length += seq_len

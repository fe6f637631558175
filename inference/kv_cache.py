"""The naive KV cache: one contiguous (K, capacity, d) buffer per sequence and layer.

Why a cache: without one, generating token t recomputes keys and values for all t-1
earlier tokens, O(T^2) work per sequence; with one, each step computes K/V for one new
token and attends over the stored ones. The cost is memory: 2 (K and V) x layers x
kv_heads x head_dim x bytes per token, reserved up front for the longest sequence.

The model talks to any cache through four calls, so a paged cache can replace this one
without touching the model:
    positions(B, T, device) -> (B, T) absolute positions of the incoming tokens
    max_length()            -> tokens already stored for the longest sequence
    attend(layer, q, k, v)  -> stores k, v for this layer and returns attention output
    advance(T)              -> called by the model after its last layer
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NaiveKVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype=torch.float32, device="cpu"):
        shape = (batch_size, num_kv_heads, capacity, head_dim)  # (B, K, capacity, d)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # tokens stored so far (the same for every sequence of the batch)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "NaiveKVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, capacity, p.dtype, p.device)

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        if self.length + seq_len > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} exceeded: {self.length} cached + {seq_len} new tokens; "
                f"create the cache with a larger capacity"
            )
        return torch.arange(self.length, self.length + seq_len, device=device).expand(batch_size, seq_len)

    def max_length(self) -> int:
        return self.length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, T, d); k, v: (B, K, T, d)
        T, end = q.shape[2], self.length + q.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, K, S, d), S = end
        # Query i sits at position length + i and may see keys 0 .. length + i.
        mask = None
        if T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=self.length)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def advance(self, seq_len: int) -> None:
        self.length += seq_len

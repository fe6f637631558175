"""The grouped-query attention layer the zoo's attention families share, with its options as arguments.

    x (B, T, D) -> q, k, v projections -> [q_norm, k_norm] -> RoPE -> attention -> o_proj -> (B, T, D)

One module serves Llama 3, Mixtral, Nemotron-H's attention layers and Gemma 2 / Gemma 3; what
differs between them is passed in, never copied into another `forward`:
- `scale`: the softmax scale (1/sqrt(head_dim) by default; Gemma's is query_pre_attn_scalar^-0.5);
- `window`: a sliding-window layer sees the last `window` tokens, itself included (None: all);
- `softcap`: scores pass through softcap * tanh(score / softcap) before the softmax (Gemma 2);
- `qk_norm`: the QK-norm hook, a factory `qk_norm(head_dim) -> module` that makes `q_norm` and
  `k_norm`, applied to every head of q and k before RoPE (Gemma 3; Qwen3 normalises the same way).
The math is in architectures/common/attention.py: `causal_attention` without a cache, `attend_kv`
with one. `cache_spec()` declares the layer's window and soft-cap with its keys and values, so a
cache keeps and masks what this layer needs without reading any config.

Module names are transformers' (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`).
Symbols: B batch, T tokens in this call, D hidden_size, H query heads, K key/value heads, d head_dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from architectures.common.attention import attend_kv, causal_attention
from architectures.common.cache import KVSpec
from architectures.common.rope import apply_rope


class GroupedQueryAttention(nn.Module):
    """softmax(q k^T * scale [soft-capped] + causal [sliding-window] mask) v, with K <= H key/value heads.

    The sizes come from the config's fields (hidden_size, num_attention_heads, num_key_value_heads,
    head_dim, attention_bias, dropout), which every attention family names alike; the per-layer
    options are arguments. Without a cache it attends within the call; with one, it hands its new
    K/V to the cache and attends over everything stored: a naive or a paged cache changes where
    K/V live without touching this code."""

    def __init__(self, cfg, layer_idx: int, *, scale: float | None = None, window: int | None = None,
                 softcap: float | None = None, qk_norm: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        self.window, self.softcap = window, softcap
        self.dropout = getattr(cfg, "dropout", 0.0)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        # The QK-norm hook: one norm over head_dim for q, one for k, shared by all heads.
        self.q_norm = qk_norm(self.head_dim) if qk_norm is not None else None
        self.k_norm = qk_norm(self.head_dim) if qk_norm is not None else None

    def cache_spec(self) -> KVSpec:
        return KVSpec(self.n_kv_heads, self.head_dim, window=self.window, softcap=self.softcap)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, d)
        if self.q_norm is not None:  # QK-norm: each head's q and k normalised over its d channels
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                                   self.dropout if self.training else 0.0, window=self.window,
                                   softcap=self.softcap).transpose(1, 2)  # (B, T, H, d)
        else:
            out = attend_kv(self.layer_idx, q, k, v, cache, self.scale, softcap=self.softcap)  # (B, T, H, d)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))

"""Llama 3, from scratch: RoPE (with Llama 3.1 frequency scaling), grouped-query attention and a
SwiGLU feed-forward, in the zoo's pre-norm decoder stack.

Papers: "The Llama 3 Herd of Models" (2024, arXiv:2407.21783); RoPE: "RoFormer" (2021,
arXiv:2104.09864); GQA: "GQA: Training Generalized Multi-Query Transformer Models" (2023,
arXiv:2305.13245); SwiGLU: "GLU Variants Improve Transformer" (2020, arXiv:2002.05202).
Reference implementation it is tested against: transformers' `LlamaForCausalLM`
(tests/architectures/test_conformance.py). Module names mirror it, so a
published checkpoint's tensors load by name with no renaming table.

The stack itself (embedding, pre-norm blocks with RMSNorm, final norm, head, input checks,
init rule) is shared by every family and lives in architectures/common/decoder.py; this file is
what makes it Llama: which mixer and feed-forward each layer gets (`Llama3.make_mixer`,
`Llama3.make_ffn`) and what they compute.

Symbols: B batch, T tokens in this call, S tokens attended to (cache + new), D hidden_size,
H query heads, K key/value heads, d head_dim, V vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from architectures.common.attention import attend_kv, causal_attention
from architectures.common.cache import KVSpec
from architectures.common.decoder import CausalLM, RMSNorm
from architectures.common.rope import RotaryEmbedding as BaseRotaryEmbedding
from architectures.common.rope import apply_rope, rope_parameters, rope_tables
from architectures.llama3.config import LlamaConfig

__all__ = ["Llama3", "Attention", "SwiGLU", "RotaryEmbedding", "RMSNorm", "apply_rope", "rope_inverse_frequencies",
           "rope_tables"]


def rope_inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2, optionally rescaled as in Llama 3.1 (architectures/common/rope.py
    holds the formulas, beside YaRN's)."""
    return rope_parameters(cfg.head_dim, cfg.rope_theta, llama3_scaling(cfg))[0]


def llama3_scaling(cfg: LlamaConfig) -> dict | None:
    """Our config's rope_scaling (Llama 3.1's four keys, or None) as a rope_scaling dict with its type."""
    return None if cfg.rope_scaling is None else dict(cfg.rope_scaling, rope_type="llama3")


class RotaryEmbedding(BaseRotaryEmbedding):
    """Llama's RoPE tables: head_dim channels, base rope_theta, Llama 3.1 scaling when configured."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg.head_dim, cfg.rope_theta, llama3_scaling(cfg))
        self.config = cfg


class Attention(nn.Module):
    """Grouped-query attention: softmax(q k^T / sqrt(d) + causal mask) v, with K <= H key/value heads.

    Without a cache it attends within the call (`causal_attention`); with one, it hands its new
    K/V to the cache and attends over everything stored (`attend_kv`): a naive or a paged cache
    changes where K/V live without touching this code. It declares what it caches per token with
    `cache_spec()`: a key and a value of K heads x d."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = cfg.dropout
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def cache_spec(self) -> KVSpec:
        return KVSpec(self.n_kv_heads, self.head_dim)

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, d)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, K, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, d)
        if cache is None:
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                                   self.dropout if self.training else 0.0).transpose(1, 2)  # (B, T, H, d)
        else:
            out = attend_kv(self.layer_idx, q, k, v, cache, self.scale)  # (B, T, H, d)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x): a gated linear unit with a SiLU gate."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Llama3(CausalLM):
    """Decoder-only language model: input_ids (B, T) -> logits (B, T, V).

    Every layer is grouped-query attention followed by a SwiGLU; all layers share one RoPE table.
    """

    config_class = LlamaConfig

    def make_mixer(self, cfg: LlamaConfig, layer_idx: int) -> nn.Module:
        return Attention(cfg, layer_idx)

    def make_ffn(self, cfg: LlamaConfig, layer_idx: int) -> nn.Module:
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def make_rotary(self, cfg: LlamaConfig) -> nn.Module:
        return RotaryEmbedding(cfg)

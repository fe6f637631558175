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
`Llama3.make_ffn`) and what they compute. The attention layer is the zoo's shared grouped-query
attention (architectures/common/attention_layer.py), imported here as `Attention` with its
defaults: scale 1/sqrt(d), no window, no soft-cap, no QK-norm.

Symbols: B batch, T tokens in this call, S tokens attended to (cache + new), D hidden_size,
H query heads, K key/value heads, d head_dim, V vocab_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.common.attention_layer import GroupedQueryAttention as Attention
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

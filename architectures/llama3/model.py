"""Llama 3, from scratch: RoPE (with Llama 3.1 frequency scaling), grouped-query attention and a
SwiGLU feed-forward, in the zoo's pre-norm decoder stack.

Papers: "The Llama 3 Herd of Models" (2024, arXiv:2407.21783); RoPE: "RoFormer" (2021,
arXiv:2104.09864); GQA: "GQA: Training Generalized Multi-Query Transformer Models" (2023,
arXiv:2305.13245); SwiGLU: "GLU Variants Improve Transformer" (2020, arXiv:2002.05202).
Reference implementation it is tested against: transformers' `LlamaForCausalLM`
(tests/architectures/llama3/test_matches_transformers.py). Module names mirror it, so a
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
from architectures.llama3.config import LlamaConfig

__all__ = ["Llama3", "Attention", "SwiGLU", "RotaryEmbedding", "RMSNorm", "apply_rope", "rope_inverse_frequencies"]


def rope_inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2, optionally rescaled as in Llama 3.1.

    Llama 3.1 scaling keeps high frequencies (wavelength < original_context/high_freq_factor)
    unchanged, divides low frequencies (wavelength > original_context/low_freq_factor) by
    `factor`, and interpolates smoothly in between, so the model sees long contexts without
    retraining the short-range positional detail.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


@torch.library.custom_op("zoo::rope_tables", mutates_args=())
def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles: positions (B, T) int, inv_freq (d/2,) -> two (B, T, d) fp32.

    A custom op, so that torch.compile treats it as one opaque kernel whose two small outputs are
    kept (and saved for the backward). Written as plain tensor code, the compiler inlines the
    cos/sin into every kernel that reads the tables: each layer's RoPE recomputed the
    transcendentals for every element of q and k, forward and backward, which cost 9% of the
    compiled training step of the gpt2-124m preset on an H100 (notes/training-loop.md).
    """
    angles = positions[..., None].float() * inv_freq.float()  # (B, T, d/2), in fp32 for accuracy at large positions
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d): the half-split channel layout
    return angles.cos(), angles.sin()


@rope_tables.register_fake
def _rope_tables_shapes(positions, inv_freq):
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


class RotaryEmbedding(nn.Module):
    """Maps absolute positions to the (cos, sin) tables that rotate queries and keys."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        # Not persistent: it is derived from the config, and checkpoints do not carry it.
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the table (a model built on the meta device has none; see build_and_load)."""
        self.inv_freq.copy_(rope_inverse_frequencies(self.config))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) or (1, T) int -> cos, sin: (B or 1, T, 1, d) fp32, broadcast over heads
        cos, sin = rope_tables(positions, self.inv_freq)
        return cos[:, :, None], sin[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, T, heads, d) by position-dependent angles.

    Pairs are the two halves of the head, not adjacent channels: that is the layout of the
    Hugging Face checkpoints (whose q/k weights were permuted from Meta's interleaved layout).
    The angles are computed in fp32 and the rotation runs in x's dtype, as the reference does:
    under bf16 that saves an upcast of q and k in every layer.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


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

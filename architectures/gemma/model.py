"""Gemma 2 and Gemma 3 (text), from scratch: local and global attention layers, soft-capping, QK-norm,
four norms per block, GeGLU, and embeddings scaled by sqrt(d_model).

Papers: "Gemma 2: Improving Open Language Models at a Practical Size" (2024, arXiv:2408.00118);
"Gemma 3 Technical Report" (2025, arXiv:2503.19786). Reference implementations it is tested
against: transformers' `Gemma2ForCausalLM` and `Gemma3ForCausalLM` (tests/architectures/test_conformance.py,
tests/architectures/gemma/). Module names mirror them, so published checkpoints load by name.

What this file adds to the zoo's shared stack (architectures/common/decoder.py):
- `GemmaRMSNorm`: x / rms(x) * (1 + w), computed in fp32 and rounded once at the end; w starts at 0;
- `ScaledEmbedding`: the embedding times sqrt(d_model), rounded to the embedding's dtype first;
- `GeGLU`: W_down (gelu_tanh(W_gate x) * W_up x);
- `GemmaDecoderLayer`: a norm before AND after each sub-layer (four per block), so the residual
  stream receives normalised updates;
- `GemmaRotaryEmbedding`: one RoPE table per layer type (Gemma 3's local base 10k, global 1M);
- final-logit soft-capping, through `CausalLM.logit_softcap`.
The attention layer is the zoo's shared grouped-query attention (architectures/common/attention_layer.py)
given each layer's options: scale query_pre_attn_scalar^-0.5, the sliding window on local layers,
Gemma 2's attention soft-cap, Gemma 3's QK-norm.

Symbols: B batch, T tokens in this call, D hidden_size, F intermediate_size, V vocab_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.common.attention_layer import GroupedQueryAttention
from architectures.common.cache import KVSpec
from architectures.common.decoder import CausalLM, DecoderModel
from architectures.common.rope import RotaryEmbedding
from architectures.gemma.config import GemmaConfig


class GemmaRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (1 + w), with w initialised to 0 (so the gain starts at 1).

    Unlike the zoo's RMSNorm (architectures/common/decoder.py), the gain multiplies in fp32 and
    the result is rounded to x's dtype once, after it: this is how Gemma's checkpoints were made."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Embedding rows times sqrt(d_model). The factor is rounded to the weight's dtype before the
    multiply, as transformers does: under bf16, sqrt(1152) = 33.94 becomes 34.0."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)  # (B, T, D)
        # sqrt(D) in fp32, then rounded to x's dtype (made on x's device: no host copy in a CUDA graph)
        return x * torch.full((), self.embedding_dim ** 0.5, device=x.device).to(x.dtype)


class GeGLU(nn.Module):
    """FFN(x) = W_down (gelu_tanh(W_gate x) * W_up x): a gated linear unit with a GELU gate
    ("GLU Variants Improve Transformer", Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaRotaryEmbedding(nn.Module):
    """positions -> {layer type: (cos, sin)}: the local layers' table (base rope_local_base_freq) and the
    global layers' (base rope_theta, with its scaling). Gemma 2 has one base, so one table serves both."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.local = RotaryEmbedding(cfg.head_dim, cfg.rope_local_base_freq)
        self.shared = cfg.rope_local_base_freq == cfg.rope_theta and cfg.rope_scaling is None
        self.full = None if self.shared else RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        local = self.local(positions)  # cos, sin: (B or 1, T, 1, d)
        return {"sliding_attention": local, "full_attention": local if self.shared else self.full(positions)}


class GemmaDecoderLayer(nn.Module):
    """h = x + post_attn_norm(Attention(input_norm(x))); out = h + post_ffw_norm(GeGLU(pre_ffw_norm(h))).

    Called as layer(x, rope, cache) like every block of the zoo; `rope` holds a table per layer type
    and the block hands its attention the one of its own type."""

    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(D, eps)
        self.self_attn = GroupedQueryAttention(
            cfg, layer_idx, scale=cfg.query_pre_attn_scalar ** -0.5, window=cfg.window(layer_idx),
            softcap=cfg.attn_logit_softcapping, qk_norm=(lambda d: GemmaRMSNorm(d, eps)) if cfg.qk_norm else None)
        self.post_attention_layernorm = GemmaRMSNorm(D, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(D, eps)
        self.mlp = GeGLU(D, cfg.intermediate_size)
        self.post_feedforward_layernorm = GemmaRMSNorm(D, eps)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def cache_spec(self) -> KVSpec:
        return self.self_attn.cache_spec()

    def forward(self, x, rope, cache=None):
        h = self.self_attn(self.input_layernorm(x), rope[self.layer_type], cache)  # (B, T, D)
        x = x + self.resid_dropout(self.post_attention_layernorm(h))
        h = self.mlp(self.pre_feedforward_layernorm(x))  # (B, T, D)
        return x + self.resid_dropout(self.post_feedforward_layernorm(h))


class GemmaStack(DecoderModel):
    """The shared stack with Gemma's scaled embedding and (1 + w) final norm, under the same names."""

    def __init__(self, cfg: GemmaConfig, layers: list[nn.Module], rotary: nn.Module):
        super().__init__(cfg, layers, rotary)
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma(CausalLM):
    """Decoder-only language model: input_ids (B, T) -> logits (B, T, V), soft-capped when configured.

    Layer i attends over its last `sliding_window` tokens when config.layer_types[i] is
    "sliding_attention" (local) and over the whole prefix when it is "full_attention" (global)."""

    config_class = GemmaConfig

    def __init__(self, cfg: GemmaConfig):
        super().__init__(cfg)
        self.logit_softcap = cfg.final_logit_softcapping  # compute_logits: c * tanh(z / c)

    def make_layer(self, cfg: GemmaConfig, layer_idx: int) -> nn.Module:
        return GemmaDecoderLayer(cfg, layer_idx)

    def make_rotary(self, cfg: GemmaConfig) -> nn.Module:
        return GemmaRotaryEmbedding(cfg)

    def make_stack(self, cfg: GemmaConfig, layers: list[nn.Module]) -> nn.Module:
        return GemmaStack(cfg, layers, self.make_rotary(cfg))

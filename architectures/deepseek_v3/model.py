"""DeepSeek-V3, from scratch: multi-head latent attention (MLA) with decoupled RoPE and YaRN, and
DeepSeekMoE feed-forwards after a few dense layers, in the zoo's pre-norm decoder stack.

Papers: "DeepSeek-V3 Technical Report" (2024, arXiv:2412.19437); MLA: "DeepSeek-V2" (2024,
arXiv:2405.04434, section 2.1). Reference implementation it is tested against: transformers'
`DeepseekV3ForCausalLM` (tests/architectures/deepseek_v3/test_matches_transformers.py); module
names mirror it, so hub checkpoints load by name (pretrained.py converts the per-expert layout).

MLA, per token, in the paper's symbols (notes/deepseek-v3.md writes it out):
    c_kv = RMSNorm(W_DKV h)                (d_c)          the latent: the ONLY per-head-free thing cached ...
    k_R  = RoPE(W_KR h)                    (d_h^R)        ... with one RoPE key shared by all heads
    k_i  = [W_UK_i c_kv ; k_R], v_i = W_UV_i c_kv         per head i: d_h + d_h^R, d_v
    q_i  = [W_UQ_i c_q ; RoPE(W_QR_i c_q)], c_q = RMSNorm(W_DQ h)  (or q = W_Q h without q-LoRA)
Code names: W_DKV and W_KR are `kv_a_proj_with_mqa` (one matrix, d_c + d_h^R outputs), W_UK and
W_UV are `kv_b_proj`, W_DQ `q_a_proj`, W_UQ and W_QR `q_b_proj`.

With a cache, attention runs in the latent space ("absorbed"): q_i^T k_j = (W_UK_i^T q_i^C)^T c_kv_j +
q_i^R . k_R_j, so keys are never decompressed; the output is W_UV_i (sum_j p_ij c_kv_j).

Symbols: B batch, T new tokens, S cached + new tokens, D hidden_size, H heads, d_c kv_lora_rank,
d_n qk_nope_head_dim (= d_h), d_r qk_rope_head_dim (= d_h^R), d_v v_head_dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from architectures.common.attention import causal_attention, grouped_attention
from architectures.common.cache import CacheView, LatentSpec
from architectures.common.decoder import CausalLM, RMSNorm
from architectures.common.moe import StackedExperts
from architectures.common.rope import RotaryEmbedding, apply_rope, deinterleave, softmax_scale
from architectures.deepseek_v3.config import DeepseekV3Config
from architectures.deepseek_v3.moe import DeepseekMoE, Router
from architectures.llama3.model import SwiGLU

# transformers builds the two latent norms with RMSNorm's default epsilon, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """MLA: caches c_kv (d_c) and the shared RoPE key (d_r) per token, one row of d_c + d_r numbers
    instead of 2 * H * d_h; declared as `LatentSpec(kv_lora_rank + qk_rope_head_dim, value_width=kv_lora_rank)`."""

    # With a cache, steps whose sequences bring more than one query each (prefills) decompress the
    # latents into per-head K/V, which costs fewer FLOPs for long prompts; decode steps attend in
    # the latent space. False: absorbed for every step (the tests compare the two).
    decompress_prefill = True

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.d_c, self.d_n, self.d_r, self.d_v = (cfg.num_attention_heads, cfg.kv_lora_rank,
                                                          cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.interleaved = cfg.rope_interleave
        self.q_lora = cfg.q_lora_rank is not None
        self.dropout = cfg.dropout
        # 1/sqrt(d_n + d_r), times YaRN's mscale^2: the scale of the full q.k, whichever form computes it.
        self.scale = softmax_scale(cfg.qk_head_dim, cfg.rope_parameters)
        D, H, bias = cfg.hidden_size, self.H, cfg.attention_bias
        if not self.q_lora:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)  # [W_UQ; W_QR] per head
        self.kv_a_proj_with_mqa = nn.Linear(D, self.d_c + self.d_r, bias=bias)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.d_c, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.d_c, H * (self.d_n + self.d_v), bias=False)  # [W_UK_i; W_UV_i] per head
        self.o_proj = nn.Linear(H * self.d_v, D, bias=bias)

    def cache_spec(self) -> LatentSpec:
        return LatentSpec(self.d_c + self.d_r, value_width=self.d_c)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the d_r rotary channels: adjacent pairs in DeepSeek's checkpoints, halves otherwise."""
        return apply_rope(deinterleave(x) if self.interleaved else x, cos, sin)

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK: (H, d_n, d_c) and W_UV: (H, d_v, d_c), views of kv_b_proj's rows, head by head."""
        w = self.kv_b_proj.weight.view(self.H, self.d_n + self.d_v, self.d_c)
        return w[:, :self.d_n], w[:, self.d_n:]

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        cos, sin = rope
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, self.H, self.d_n + self.d_r)
        q_nope, q_rope = q.split([self.d_n, self.d_r], dim=-1)  # (B, T, H, d_n), (B, T, H, d_r)
        q_rope = self.rope(q_rope, cos, sin)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.d_c, self.d_r], dim=-1)  # (B, T, d_c), (B, T, d_r)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = self.rope(k_rope[:, :, None], cos, sin)  # (B, T, 1, d_r): one key for all heads
        if cache is None:
            out = self.attend_explicit(q_nope, q_rope, c_kv, k_rope[:, :, 0], None)  # (B, T, H, d_v)
        else:
            cache.write(self.layer_idx, latent=torch.cat([c_kv, k_rope[:, :, 0]], dim=-1))  # (B, T, d_c + d_r)
            view = cache.read(self.layer_idx)
            lat = view.tensors.get("latent")  # (Bq, S, d_c + d_r); None when a kernel reads the cache in place
            queries_per_seq = view.mask.shape[-2] if view.mask is not None else 1
            if view.kernel is None and self.decompress_prefill and queries_per_seq > 1:
                out = self.attend_explicit(q_nope, q_rope, lat[..., :self.d_c], lat[..., self.d_c:], view)
            else:
                out = self.attend_absorbed(q_nope, q_rope, lat, view)
        return self.o_proj(out.reshape(B, T, self.H * self.d_v))

    def attend_explicit(self, q_nope, q_rope, c_kv, k_rope, view: CacheView | None) -> torch.Tensor:
        """Decompress per-head K and V from the latents and attend as ordinary multi-head attention.

        q_nope (B, T, H, d_n), q_rope (B, T, H, d_r); c_kv (Bk, S, d_c), k_rope (Bk, S, d_r): the
        new tokens' latents (view None: causal within the call) or the cache's (in the view's layout)."""
        Bk, S, _ = c_kv.shape
        k_nope, v = self.kv_b_proj(c_kv).view(Bk, S, self.H, self.d_n + self.d_v).split([self.d_n, self.d_v], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(Bk, S, self.H, self.d_r)], dim=-1)  # (Bk, S, H, d_n + d_r)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, d_n + d_r)
        if view is None:
            return causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                                    self.dropout if self.training else 0.0).transpose(1, 2)  # (B, T, H, d_v)
        return view.unpack(grouped_attention(view.pack(q), k, v, view.mask, self.scale))

    def attend_absorbed(self, q_nope, q_rope, lat, view: CacheView) -> torch.Tensor:
        """Attention in the latent space, over the cached rows [c_kv ; k_R] without decompressing them.

        q_i^C . (W_UK_i c_kv) = (W_UK_i^T q_i^C) . c_kv: fold W_UK into the query, so every head's
        query becomes a (d_c + d_r) vector [W_UK_i^T q_i^C ; q_i^R] against ONE shared key row
        [c_kv ; k_R] and ONE shared value row c_kv (multi-query attention with K=1 over the latent).
        Then W_UV maps each head's latent output o_i^C to d_v. The scale is the full q.k's."""
        w_uk, w_uv = self.up_projections()  # (H, d_n, d_c), (H, d_v, d_c)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # (B, T, H, d_c)
        q_abs = torch.cat([q_lat, q_rope], dim=-1)  # (B, T, H, d_c + d_r)
        if view.kernel is not None:  # the paged engine's decode kernel reads the latent rows where they lie
            o_lat = view.kernel(q_abs, self.scale)  # (B, T, H, d_c)
        else:
            key = lat[:, :, None]  # (Bq, S, 1, d_c + d_r)
            value = lat[:, :, None, :self.d_c]  # (Bq, S, 1, d_c)
            o_lat = view.unpack(grouped_attention(view.pack(q_abs), key, value, view.mask, self.scale))  # (B, T, H, d_c)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, d_v)


class DeepseekV3(CausalLM):
    """Decoder-only language model: input_ids (B, T) -> logits (B, T, V).

    Every layer is MLA; the feed-forward of layer i is a dense SwiGLU for i < first_k_dense_replace
    and DeepSeekMoE after (DeepSeek's reference: `MLP if layer_id < n_dense_layers else MoE`)."""

    config_class = DeepseekV3Config

    def make_mixer(self, cfg: DeepseekV3Config, layer_idx: int) -> nn.Module:
        return MultiHeadLatentAttention(cfg, layer_idx)

    def make_ffn(self, cfg: DeepseekV3Config, layer_idx: int) -> nn.Module:
        if cfg.is_moe(layer_idx):
            return DeepseekMoE(cfg, layer_idx)
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def make_rotary(self, cfg: DeepseekV3Config) -> nn.Module:
        # Only the d_r rotary channels rotate; YaRN stretches them to the long context.
        return RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_parameters)

    def _init_weights(self, m: nn.Module):
        super()._init_weights(m)  # every nn.Linear and the embedding: N(0, initializer_range)
        std = self.config.initializer_range
        if isinstance(m, Router):
            m.init_weights(std)
        if isinstance(m, StackedExperts):
            # GPT-2's scaled init for the residual branch's output, as the dense down_proj gets.
            m.init_weights(std, down_std=std / math.sqrt(2 * self.config.num_hidden_layers))

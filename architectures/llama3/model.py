"""Llama 3, from scratch: RMSNorm, RoPE (with Llama 3.1 frequency scaling), grouped-query
attention and a SwiGLU feed-forward, in a pre-norm decoder-only transformer.

Papers: "The Llama 3 Herd of Models" (2024, arXiv:2407.21783); RoPE: "RoFormer" (2021,
arXiv:2104.09864); GQA: "GQA: Training Generalized Multi-Query Transformer Models" (2023,
arXiv:2305.13245); SwiGLU: "GLU Variants Improve Transformer" (2020, arXiv:2002.05202).
Reference implementation it is tested against: transformers' `LlamaForCausalLM`
(tests/architectures/llama3/test_matches_transformers.py). Module names mirror it, so a
published checkpoint's tensors load by name with no renaming table.

Symbols: B batch, T tokens in this call, S tokens attended to (cache + new), D hidden_size,
H query heads, K key/value heads, d head_dim, V vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from architectures.llama3.config import LlamaConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g. No mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16: the mean of squares loses precision in half types.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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
        # Not persistent: it is derived from the config, and checkpoints do not carry it.
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) or (1, T) int -> cos, sin: (B or 1, 1, T, d) fp32, broadcast over heads
        cos, sin = rope_tables(positions, self.inv_freq)
        return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, heads, T, d) by position-dependent angles.

    Pairs are the two halves of the head, not adjacent channels: that is the layout of the
    Hugging Face checkpoints (whose q/k weights were permuted from Meta's interleaved layout).
    The angles are computed in fp32 and the rotation runs in x's dtype, as the reference does:
    under bf16 that saves an upcast of q and k in every layer.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d) + causal mask) v with K <= H key/value heads (GQA).

    q: (B, H, T, d); k, v: (B, K, T, d) -> (B, H, T, d). SDPA dispatches to a flash kernel
    on GPUs; enable_gqa lets each group of H/K query heads read one K/V head without a copy.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)


class Attention(nn.Module):
    """Grouped-query attention. The KV cache is pluggable: a cache object receives this
    layer's new keys and values and returns the attention output, so a naive or a paged
    cache changes how K/V are stored without touching the model."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.dropout = cfg.dropout
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        else:
            out = cache.attend(self.layer_idx, q, k, v)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x): a gated linear unit with a SiLU gate."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class LlamaModel(nn.Module):
    """Embedding, the stack of decoder layers and the final norm (transformers' `model.*`)."""

    def __init__(self, cfg: LlamaConfig, make_mlp):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, make_mlp(cfg, i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # Activation checkpointing: keep only each block's input during the forward and recompute
        # the block in backward. Activation memory drops from O(L) blocks to O(1), for ~1/3 more compute.
        self.gradient_checkpointing = False

    def forward(self, input_ids, positions, cache=None):
        x = self.dropout(self.embed_tokens(input_ids))  # (B, T, D)
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        return self.norm(x)


class Llama3(nn.Module):
    """Decoder-only language model: input_ids (B, T) -> logits (B, T, V).

    Subclasses (Mixtral) swap the feed-forward by overriding `make_mlp`, and reuse the rest.
    """

    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.make_mlp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std / sqrt(2 * layers),
        # so the residual stream's variance does not grow with depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

    def make_mlp(self, cfg: LlamaConfig, layer_idx: int) -> nn.Module:
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def _init_weights(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def check_input_ids(self, input_ids: torch.Tensor, start: int | None = 0) -> None:
        """Clear errors for inputs the model cannot represent (instead of an index error deep inside)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq_len), got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        T, limit = input_ids.shape[1], self.config.max_position_embeddings
        # start=None: the row packs several sequences (the paged engine), whose cache checks each length.
        if start is not None and start + T > limit:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds max_position_embeddings={limit}; "
                f"shorten the input or use a config with a longer context"
            )
        # Reading min/max synchronises a GPU with the host, so the training hot path skips it (the
        # data layer has checked the corpus), and so does CUDA-graph capture, where a sync is an error
        # (the inference engine checks every request's ids when it is submitted).
        capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if input_ids.numel() and not (self.training and input_ids.is_cuda) and not capturing \
                and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        B, T = input_ids.shape[0], input_ids.shape[-1]
        if cache is None:
            self.check_input_ids(input_ids)
            # (1, T), broadcast over the batch: every sequence has the same positions, and the
            # RoPE angles are then computed once instead of B times.
            positions = torch.arange(T, device=input_ids.device)[None]
        else:
            positions = cache.positions(B, T, input_ids.device)  # (B, T) absolute positions
            self.check_input_ids(input_ids, start=cache.max_length())
        h = self.model(input_ids, positions, cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(h)  # (B, T, V)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied embedding/head matrix once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

"""The decoder-only stack every family of the zoo is assembled from, one layer at a time.

    input_ids (B, T) -> embed -> L blocks -> final RMSNorm -> hidden (B, T, D) -> head -> logits (B, T, V)

What differs between families is inside the blocks, so the architecture chooses them per
layer, as DeepSeek-V3's reference picks each layer's feed-forward (`MLP if layer_id <
n_dense_layers else MoE`) and NemotronH builds each layer from a pattern letter:
- `make_mixer(cfg, i)`: the token mixer of layer i (attention of some kind, or a state-space mixer);
- `make_ffn(cfg, i)`: its feed-forward (a dense SwiGLU, a mixture of experts);
- `make_layer(cfg, i)`: the whole block, a pre-norm `DecoderLayer` of the two by default;
- `make_rotary(cfg)`: the position tables the mixers share (None when no layer uses RoPE).
This file holds what no family changes: RMSNorm, the pre-norm block, the stack, input checks,
the init rule, and the split of the forward pass into hidden states and a separate head, so
that inference computes logits only at the positions it samples from.

Module names are transformers' (`model.embed_tokens`, `model.layers.{i}.self_attn`, `.mlp`,
`.input_layernorm`, `.post_attention_layernorm`, `model.norm`, `lm_head`), so published
checkpoints load by name.

Symbols: B batch, T tokens in this call, D hidden_size, V vocab_size, L layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from architectures.common.cache import CacheSpec


def softcap_logits(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(z / cap): every logit squashed into (-cap, cap), nearly unchanged where |z| << cap;
    z itself when cap is None. d/dz = 1 - tanh(z / cap)^2, so a logit near the cap stops learning."""
    return z if cap is None else torch.tanh(z / cap) * cap


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g. No mean subtraction and no bias, unlike LayerNorm.
    "Root Mean Square Layer Normalization" (Zhang & Sennrich, 2019, arXiv:1910.07467)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16: the mean of squares loses precision in half types.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Mixer(RMSNorm(x)); out = h + FFN(RMSNorm(h)).

    The mixer is called as mixer(x, rope, cache) and declares its cache with `cache_spec()`;
    the feed-forward is called as ffn(x)."""

    def __init__(self, cfg, mixer: nn.Module, ffn: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = mixer
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = ffn
        self.resid_dropout = nn.Dropout(getattr(cfg, "dropout", 0.0))

    def cache_spec(self) -> CacheSpec | None:
        return self.self_attn.cache_spec()

    def forward(self, x, rope, cache=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, cache))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


def run_layers(layers: nn.ModuleList, x: torch.Tensor, rope, cache, checkpointing: bool) -> torch.Tensor:
    """x (B, T, D) through every block in order, each called as layer(x, rope, cache); every stack of
    the zoo runs its blocks through here, whatever it names its embedding and final norm.

    checkpointing: keep only each block's input during the forward and recompute the block in
    backward (activation memory from O(L) blocks to O(1), for ~1/3 more compute)."""
    for layer in layers:
        if checkpointing:
            x = checkpoint(layer, x, rope, cache, use_reentrant=False)
        else:
            x = layer(x, rope, cache)
    return x  # (B, T, D)


class DecoderModel(nn.Module):
    """Embedding, the stack of blocks and the final norm (transformers' `model.*`): ids -> hidden states."""

    def __init__(self, cfg, layers: list[nn.Module], rotary: nn.Module | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = rotary
        self.dropout = nn.Dropout(getattr(cfg, "dropout", 0.0))
        self.gradient_checkpointing = False  # activation checkpointing while training (`run_layers`)

    def forward(self, input_ids, positions, cache=None):
        x = self.dropout(self.embed_tokens(input_ids))  # (B, T, D)
        rope = self.rotary_emb(positions) if self.rotary_emb is not None else None
        x = run_layers(self.layers, x, rope, cache, self.gradient_checkpointing and self.training)
        return self.norm(x)  # (B, T, D)


class CausalLM(nn.Module):
    """A decoder-only language model: `model(input_ids)` (B, T) -> logits (B, T, V).

    Behind that face, `hidden_states(input_ids, cache)` -> (B, T, D) and `compute_logits(h)` ->
    (..., V) are separate calls: generation computes logits for the last position of each
    sequence only (at a 128k vocabulary, logits for every prompt token of a 4,096-token prefill
    are 1 GiB in bf16). A family subclasses this, sets `config_class`, and chooses its blocks
    with `make_mixer` / `make_ffn` (or `make_layer`) and `make_rotary`.
    """

    config_class = None
    # Output projections of the residual branches: GPT-2's scaled init (below) applies to them.
    residual_projections = ("o_proj.weight", "down_proj.weight")
    residual_branches_per_layer = 2  # a mixer and a feed-forward per block (1 for one-mixer blocks)
    stack_name = "model"  # the stack's attribute, as checkpoints name it (Mamba-2's is `backbone`)
    # Final-logit soft-capping: logits = c * tanh(z / c) for the head's output z (Gemma 2), or None.
    # `compute_logits` applies it and the chunked loss reads it (architectures/common/loss.py).
    logit_softcap: float | None = None

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        layers = [self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers)]
        setattr(self, self.stack_name, self.make_stack(cfg, layers))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std / sqrt(branches), so
        # the residual stream's variance does not grow with depth at initialisation.
        branches = self.residual_branches_per_layer * cfg.num_hidden_layers
        for name, p in self.named_parameters():
            if name.endswith(self.residual_projections):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(branches))

    def tie_weights(self) -> None:
        """The output head shares the embedding matrix when the config says so (re-made after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- what a family chooses --------------------------------------------------------------------

    def make_mixer(self, cfg, layer_idx: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must say which token mixer layer {layer_idx} uses")

    def make_ffn(self, cfg, layer_idx: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must say which feed-forward layer {layer_idx} uses")

    def make_layer(self, cfg, layer_idx: int) -> nn.Module:
        return DecoderLayer(cfg, self.make_mixer(cfg, layer_idx), self.make_ffn(cfg, layer_idx))

    def make_rotary(self, cfg) -> nn.Module | None:
        return None

    def make_stack(self, cfg, layers: list[nn.Module]) -> nn.Module:
        """Embedding, blocks and final norm; a family whose checkpoints lay them out otherwise overrides it."""
        return DecoderModel(cfg, layers, self.make_rotary(cfg))

    # ---- shared -----------------------------------------------------------------------------------

    def cache_specs(self) -> list[CacheSpec | None]:
        """What each layer keeps per token or per sequence while generating (architectures/common/cache.py)."""
        return [layer.cache_spec() for layer in self.model.layers]

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

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

    def hidden_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, D), after the last norm, before the head."""
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
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., V) logits: pass only the positions that need them."""
        return softcap_logits(self.lm_head(hidden), self.logit_softcap)

    def forward(self, input_ids: torch.Tensor, cache=None, *, hidden_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with hidden_only, the final hidden states (B, T, D) instead, for a loss that
        applies the head itself (a chunked cross-entropy) while the call still goes through forward,
        where DDP and FSDP hook in."""
        h = self.hidden_states(input_ids, cache)
        return h if hidden_only else self.compute_logits(h)  # (B, T, D) or (B, T, V)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied embedding/head matrix once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

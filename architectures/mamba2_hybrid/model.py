"""Mamba-2 and Nemotron-H: a stack of one-mixer blocks, each chosen by a letter of the layer pattern.

Papers: "Transformers are SSMs" (Dao & Gu, 2024, arXiv:2405.21060); "Nemotron-H: A Family of
Accurate and Efficient Hybrid Mamba-Transformer Models" (NVIDIA, 2025, arXiv:2504.03624).
Reference implementations it is tested against: transformers' `Mamba2ForCausalLM` and
`NemotronHForCausalLM` (tests/architectures/test_conformance.py, tests/architectures/mamba2_hybrid/).

Unlike the zoo's other families, a block here holds ONE mixer, not a mixer and a feed-forward:

    x = x + mixer_i(RMSNorm(x))      mixer_i by pattern letter: M Mamba-2, * attention, - MLP, E MoE

so the family builds its layers itself (`make_layer`) instead of the two-sublayer `DecoderLayer`,
and names them as the checkpoints do: `backbone.embeddings`, `backbone.layers.{i}.norm`,
`backbone.layers.{i}.mixer`, `backbone.norm_f`, `lm_head`. A pure Mamba-2 is the pattern "MMM...".
The attention layer is the zoo's shared grouped-query attention
(architectures/common/attention_layer.py), without RoPE: Nemotron-H's
attention has no position encoding (the Mamba-2 layers before it carry order), so it is given
the identity rotation cos = 1, sin = 0. The MoE layer routes with DeepSeek-V3's router, imported,
to the zoo's stacked experts (architectures/common/moe.py), here non-gated: W_down act(W_up x).
The blocks run through the shared stack's loop (`run_layers`), under the checkpoints' names.

Symbols: B batch, T tokens, D hidden_size, V vocab_size, E experts, k experts per token.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from architectures.common.cache import CacheSpec
from architectures.common.decoder import CausalLM, RMSNorm, run_layers
from architectures.common.moe import StackedExperts
from architectures.deepseek_v3.moe import Router
from architectures.common.attention_layer import GroupedQueryAttention
from architectures.mamba2_hybrid.config import Mamba2HybridConfig
from architectures.mamba2_hybrid.mixer import Mamba2Mixer

ACTIVATIONS = {"relu2": lambda x: F.relu(x).square(), "relu": F.relu, "silu": F.silu, "gelu": F.gelu}


class MLP(nn.Module):
    """FFN(x) = W_down act(W_up x): no gate (Nemotron-H's squared ReLU takes the gate's place)."""

    def __init__(self, cfg: Mamba2HybridConfig, width: int):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.mlp_hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class MoE(nn.Module):
    """MoE(x) = latent_up(routed(latent_down(x))) + shared(x), routed by DeepSeek-V3's sigmoid router."""

    def __init__(self, cfg: Mamba2HybridConfig):
        super().__init__()
        self.gate = Router(cfg)  # reads n_routed_experts, num_experts_per_tok, n_group, topk_group, ...
        # Non-gated experts in the MoE's working width d (the latent, when there is one).
        self.experts = StackedExperts(cfg.n_routed_experts, cfg.moe_latent_size or cfg.hidden_size,
                                      cfg.moe_intermediate_size, activation=ACTIVATIONS[cfg.mlp_hidden_act])
        self.shared_experts = MLP(cfg, cfg.moe_shared_expert_intermediate_size)
        latent = cfg.moe_latent_size
        self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, bias=cfg.mlp_bias) if latent else nn.Identity()
        self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, bias=cfg.mlp_bias) if latent else nn.Identity()

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D): routing is per token
        w, idx = self.gate(flat)  # (N, k) fp32, (N, k)
        routed = self.fc2_latent_proj(self.experts(self.fc1_latent_proj(flat), w, idx))
        return routed.view(B, T, D) + self.shared_experts(x)


class HybridBlock(nn.Module):
    """x + mixer(RMSNorm(x)), one mixer of any kind. Token mixers (Mamba-2, attention) are called as
    mixer(x, rope, cache) and declare their cache; MLP and MoE are called as mixer(x) and keep nothing."""

    def __init__(self, cfg: Mamba2HybridConfig, mixer: nn.Module, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = mixer
        self.residual_in_fp32 = cfg.residual_in_fp32

    def cache_spec(self) -> CacheSpec | None:
        return self.mixer.cache_spec() if self.kind in ("mamba", "attention") else None

    def forward(self, x, rope, cache=None):
        h = self.norm(x.to(self.norm.weight.dtype))
        h = self.mixer(h, rope, cache) if self.kind in ("mamba", "attention") else self.mixer(h)
        return (x.float() if self.residual_in_fp32 else x) + h


class Backbone(nn.Module):
    """Embedding, the blocks and the final norm (transformers' `backbone.*`): ids -> hidden states.

    Answers to the shared stack's names too (`embed_tokens`, `norm`), so code written against
    `architectures.common.decoder.DecoderModel` reads this one."""

    def __init__(self, cfg: Mamba2HybridConfig, layers: list[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.uses_attention = "*" in cfg.hybrid_override_pattern

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.embeddings

    @property
    def norm(self) -> RMSNorm:
        return self.norm_f

    def forward(self, input_ids, positions, cache=None):
        x = self.embeddings(input_ids)  # (B, T, D)
        # No position encoding: attention gets the identity rotation (cos 1, sin 0), computed once.
        rope = (x.new_ones(()), x.new_zeros(())) if self.uses_attention else None
        x = run_layers(self.layers, x, rope, cache, self.gradient_checkpointing and self.training)
        return self.norm_f(x.to(self.norm_f.weight.dtype))  # (B, T, D)


class Mamba2Hybrid(CausalLM):
    """Mamba-2 / Nemotron-H language model: input_ids (B, T) -> logits (B, T, V).

    Layer i is a `HybridBlock` whose mixer the letter hybrid_override_pattern[i] picks."""

    config_class = Mamba2HybridConfig
    residual_projections = ("out_proj.weight", "o_proj.weight", "down_proj.weight")
    residual_branches_per_layer = 1  # each block is one mixer (or one MLP) on the residual stream
    stack_name = "backbone"

    @property
    def model(self) -> Backbone:
        """The stack under the name the shared code uses (`CausalLM.hidden_states` calls self.model)."""
        return self.backbone

    def make_stack(self, cfg: Mamba2HybridConfig, layers: list[nn.Module]) -> nn.Module:
        return Backbone(cfg, layers)

    def make_layer(self, cfg: Mamba2HybridConfig, layer_idx: int) -> nn.Module:
        kind = cfg.layer_kind(layer_idx)
        mixer = {"mamba": lambda: Mamba2Mixer(cfg, layer_idx), "attention": lambda: GroupedQueryAttention(cfg, layer_idx),
                 "mlp": lambda: MLP(cfg, cfg.intermediate_size), "moe": lambda: MoE(cfg)}[kind]()
        return HybridBlock(cfg, mixer, kind)

    def _init_weights(self, m: nn.Module):
        super()._init_weights(m)
        std = self.config.initializer_range
        if isinstance(m, Router):
            m.init_weights(std)
        elif isinstance(m, StackedExperts):
            m.init_weights(std, down_std=std)  # unscaled, as transformers' NemotronH initialises them

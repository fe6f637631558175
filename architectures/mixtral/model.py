"""Mixtral: Llama 3 with each feed-forward replaced by a sparse mixture of SwiGLU experts.

Paper: "Mixtral of Experts" (2024, arXiv:2401.04088); the top-k router comes from
"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer" (2017,
arXiv:1701.06538). Reference implementation it is tested against: transformers'
`MixtralForCausalLM` (tests/architectures/mixtral/test_matches_transformers.py).

Attention is the zoo's shared grouped-query attention (architectures/common/attention_layer.py)
and RoPE is Llama 3's, imported; the decoder stack is the zoo's shared one
(architectures/common/decoder.py); the stacked experts and their grouped dispatch are the zoo's
shared ones (architectures/common/moe.py). This file adds only what makes the MoE layer Mixtral's,
the softmax top-k router and the logits its auxiliary losses read; `Mixtral.make_ffn` makes that
layer every block's feed-forward. Parameter names are those of transformers 5's in-memory model
(`mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`); pretrained.py converts
the per-expert layout published on the hub.

Symbols: N tokens in the call (B*T), D hidden_size, F intermediate_size (one expert's
width), E num_local_experts, k num_experts_per_tok.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from architectures.common.decoder import CausalLM
from architectures.common.moe import StackedExperts
from architectures.common.attention_layer import GroupedQueryAttention
from architectures.llama3.model import RotaryEmbedding
from architectures.mixtral.config import MixtralConfig


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits); keep the k largest; renormalise them to sum to 1.

    router_logits: (N, E) -> weights (N, k) in fp32, expert ids (N, k). The softmax runs in
    fp32 because bf16's 8-bit mantissa can flip which experts are the top k.
    """
    probs = router_logits.float().softmax(dim=-1)  # (N, E)
    top_w, top_idx = probs.topk(k, dim=-1)  # (N, k), (N, k)
    return top_w / top_w.sum(dim=-1, keepdim=True), top_idx


class SparseMoE(nn.Module):
    """MoE(x) = sum over the top-k experts e of x of  g_e(x) * SwiGLU_e(x),
    g = renormalised top-k of softmax(W_router x).

    Replaces Llama's SwiGLU in every layer. The router is named `gate` (transformers' name; not
    SwiGLU's gate). Its last logits are kept in `router_logits` for the auxiliary losses.
    """

    def __init__(self, cfg: MixtralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = StackedExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D): routing is per token, the sequence plays no part
        logits = self.gate(x)  # (N, E)
        self.router_logits = logits
        top_w, top_idx = route(logits, self.top_k)  # (N, k), (N, k)
        return self.experts(x, top_w, top_idx).view(B, T, D)

    def nonfinite_logits_error(self) -> FloatingPointError:
        """The error for NaN/inf router logits, telling a broken router from broken inputs to it."""
        bad = ~torch.isfinite(self.router_logits)
        n_bad_tokens = int(bad.any(dim=-1).sum())
        n_bad_weights = int((~torch.isfinite(self.gate.weight)).sum())
        cause = (f"its weight model.layers.{self.layer_idx}.mlp.gate.weight holds {n_bad_weights} NaN/inf values; "
                 f"the checkpoint or the training run that wrote it is broken" if n_bad_weights else
                 "its weights are finite, so the hidden states reaching it already were not "
                 "(an earlier layer or a diverged training run)")
        return FloatingPointError(
            f"the router of layer {self.layer_idx} produced NaN/inf logits for {n_bad_tokens} of "
            f"{bad.shape[0]} tokens: {cause}"
        )


def masked_moe_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The slow, obvious MoE: every expert on every token, masked by the routing weights.

    E/k times the FLOPs of the grouped dispatch; kept as the test oracle and the benchmark's
    naive baseline. x: (B, T, D) -> (B, T, D).
    """
    B, T, D = x.shape
    x = x.reshape(B * T, D)
    top_w, top_idx = route(moe.gate(x), moe.top_k)  # (N, k)
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(moe.experts.num_experts):
        weight = (top_w * (top_idx == e)).sum(dim=-1)  # (N,) zero for tokens not routed to e
        out = out + weight[:, None] * moe.experts.expert(e, x)  # (N, D): expert e on ALL tokens
    return out.to(x.dtype).view(B, T, D)


class Mixtral(CausalLM):
    """Decoder-only sparse MoE language model: input_ids (B, T) -> logits (B, T, V).

    Every layer is Llama 3's grouped-query attention followed by a sparse MoE.
    `model(ids, output_router_logits=True)` returns (logits, router_logits), a tuple with one
    (B*T, E) tensor per layer, which is what the load-balancing and z-losses read.
    """

    config_class = MixtralConfig

    def make_mixer(self, cfg: MixtralConfig, layer_idx: int) -> nn.Module:
        return GroupedQueryAttention(cfg, layer_idx)

    def make_ffn(self, cfg: MixtralConfig, layer_idx: int) -> nn.Module:
        return SparseMoE(cfg, layer_idx)

    def make_rotary(self, cfg: MixtralConfig) -> nn.Module:
        return RotaryEmbedding(cfg)

    def _init_weights(self, m: nn.Module):
        super()._init_weights(m)  # the router is an nn.Linear: N(0, initializer_range)
        if isinstance(m, StackedExperts):
            std = self.config.initializer_range
            # GPT-2's scaled init for the residual branch's output, as Llama3 gives its down_proj.
            m.init_weights(std, down_std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def hidden_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        h = super().hidden_states(input_ids, cache)  # (B, T, D)
        self.check_routers()
        return h

    def forward(self, input_ids: torch.Tensor, cache=None, output_router_logits: bool = False, *,
                hidden_only: bool = False):
        logits = super().forward(input_ids, cache, hidden_only=hidden_only)  # (B, T, V), or (B, T, D)
        if not output_router_logits:
            return logits
        return logits, tuple(layer.mlp.router_logits for layer in self.model.layers)

    def check_routers(self) -> None:
        """NaN router logits make top-k pick arbitrary experts and poison every later layer, without
        any error; name the first layer where they appeared. One host read per forward, for all
        layers; skipped while training on a GPU (the loop reports a non-finite loss there) and
        under CUDA-graph capture or torch.compile, where a read is an error or a graph break."""
        first = self.model.layers[0].mlp.router_logits
        capturing = first.is_cuda and torch.cuda.is_current_stream_capturing()
        if (self.training and first.is_cuda) or capturing or torch.compiler.is_compiling():
            return
        finite = torch.stack([torch.isfinite(layer.mlp.router_logits).all() for layer in self.model.layers])  # (L,)
        if not bool(finite.all()):
            raise self.model.layers[int((~finite).nonzero()[0])].mlp.nonfinite_logits_error()

    def active_parameters(self) -> int:
        """Parameters one token uses: all but the (E - k) experts it is not routed to, per layer."""
        cfg = self.config
        idle = cfg.num_local_experts - cfg.num_experts_per_tok
        per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
        return self.num_parameters() - cfg.num_hidden_layers * idle * per_expert

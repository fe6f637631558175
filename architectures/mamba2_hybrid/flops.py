"""Parameters and training FLOPs of Mamba-2 / Nemotron-H, as closed formulas of the config.

Per layer, with D hidden, H heads of P channels, N state size, G groups, K conv width, and for
the other letters h attention heads of d channels with k KV heads, F the MLP width, E experts of
width F_e (k_e per token), F_s the shared expert's width:

    M  Mamba-2    D (2HP + 2GN + H) + (HP + 2GN)(K + 1) + 3H + HP + HP D     (in_proj, conv + bias,
                                                                              dt_bias/A_log/D, gated norm, out_proj)
    *  attention  D h d + 2 D k d + h d D
    -  MLP        2 D F
    E  MoE        E D + E 2 F_e D + 2 D F_s                                   (router, experts, shared expert)
    every block   + D (its norm)

Checked by tests/architectures/mamba2_hybrid/test_parameters_and_flops.py against `sum(p.numel())`
of built models and against the published sizes of Mamba-2 2.7B and Nemotron-H 8B; the FLOPs
against torch's FLOP counter on a forward pass.
"""

from __future__ import annotations

import math

from architectures.mamba2_hybrid.config import Mamba2HybridConfig


def mamba_parameters(cfg: Mamba2HybridConfig) -> int:
    D, H, HP, GN, K = cfg.hidden_size, cfg.mamba_num_heads, cfg.d_inner, cfg.n_groups * cfg.ssm_state_size, cfg.conv_kernel
    in_proj = D * (2 * HP + 2 * GN + H) + (2 * HP + 2 * GN + H if cfg.use_bias else 0)
    conv = cfg.conv_dim * K + (cfg.conv_dim if cfg.use_conv_bias else 0)
    out_proj = HP * D + (D if cfg.use_bias else 0)
    return in_proj + conv + 3 * H + HP + out_proj


def attention_parameters(cfg: Mamba2HybridConfig) -> int:
    D, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return 2 * D * h * d + 2 * D * k * d


def _mlp(cfg: Mamba2HybridConfig, width: int, d: int | None = None) -> int:
    d = d or cfg.hidden_size
    return 2 * d * width + (width + d if cfg.mlp_bias else 0)


def moe_parameters(cfg: Mamba2HybridConfig, active: bool = False) -> int:
    D, E = cfg.hidden_size, cfg.n_routed_experts
    d = cfg.moe_latent_size or D
    experts = (cfg.num_experts_per_tok if active else E) * 2 * cfg.moe_intermediate_size * d
    latent = 0 if cfg.moe_latent_size is None else 2 * D * d + (D + d if cfg.mlp_bias else 0)
    return E * D + experts + latent + _mlp(cfg, cfg.moe_shared_expert_intermediate_size)


def layer_parameters(cfg: Mamba2HybridConfig, i: int, active: bool = False) -> int:
    """Block i: its mixer and its norm."""
    kind = cfg.layer_kind(i)
    mixer = {"mamba": lambda: mamba_parameters(cfg), "attention": lambda: attention_parameters(cfg),
             "mlp": lambda: _mlp(cfg, cfg.intermediate_size), "moe": lambda: moe_parameters(cfg, active)}[kind]()
    return mixer + cfg.hidden_size


def count_parameters(cfg: Mamba2HybridConfig, active: bool = False) -> int:
    """Every parameter stored (active=True: those one token touches, k of the E experts per MoE layer)."""
    V, D = cfg.vocab_size, cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else V * D
    return V * D + sum(layer_parameters(cfg, i, active) for i in range(cfg.num_hidden_layers)) + D + head


def matmul_weights(cfg: Mamba2HybridConfig) -> int:
    """Weights in a matmul per token: every active projection, the router and the output head;
    the embedding lookup, norms, biases, the convolution and the per-head scalars are not."""
    D, HP, GN, H = cfg.hidden_size, cfg.d_inner, cfg.n_groups * cfg.ssm_state_size, cfg.mamba_num_heads
    d = cfg.moe_latent_size or D
    per_kind = {
        "mamba": D * (2 * HP + 2 * GN + H) + HP * D,
        "attention": attention_parameters(cfg),
        "mlp": 2 * D * cfg.intermediate_size,
        "moe": D * cfg.n_routed_experts + cfg.num_experts_per_tok * 2 * cfg.moe_intermediate_size * d
        + 2 * D * cfg.moe_shared_expert_intermediate_size + (0 if cfg.moe_latent_size is None else 2 * D * d),
    }
    return sum(per_kind[cfg.layer_kind(i)] for i in range(cfg.num_hidden_layers)) + cfg.vocab_size * D


def ssd_flops(cfg: Mamba2HybridConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the chunked SSD (ssd.py), one layer: T tokens in c = ceil(T/Q) chunks of Q.

    Per chunk and head: C B^T over the Q x Q block (2 Q^2 N), that block times the inputs (2 Q^2 P),
    the chunk's state (2 Q P N) and state -> output (2 Q P N); over the chunks, the recurrence as
    one (c+1) x (c+1) product (2 (c+1)^2 P N per head). Linear in T: the quadratic part is per chunk."""
    H, P, N, Q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.chunk_size
    c = math.ceil(seq_len / Q)
    per_sequence = H * (c * (2 * Q * Q * (N + P) + 4 * Q * P * N) + 2 * (c + 1) ** 2 * P * N)
    return per_sequence / seq_len


def flops_per_token(cfg: Mamba2HybridConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward.

    Forward, per token: 2 per matmul weight; the depthwise convolution, 2 K per channel of (x, B, C);
    each attention layer's scores and weighted sum, 2 h d (T+1) (a causal query sees (T+1)/2 keys on
    average, as in architectures/llama3/flops.py); each Mamba-2 layer's SSD (`ssd_flops`)."""
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)]
    M, A = kinds.count("mamba"), kinds.count("attention")
    conv = 2 * cfg.conv_kernel * cfg.conv_dim
    attention = 2 * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1)
    return 3 * (2 * matmul_weights(cfg) + M * (conv + ssd_flops(cfg, seq_len)) + A * attention)

"""Parameter count and training FLOPs of Gemma 2 / Gemma 3, as closed formulas of the config.

Checked by tests/architectures/gemma/test_gemma.py against the model itself (parameters against
`sum(p.numel())`, FLOPs against a count of every matmul's shapes and every attended key).
"""

from __future__ import annotations

from architectures.gemma.config import GemmaConfig


def count_parameters(cfg: GemmaConfig) -> int:
    """V*D embedding (+ V*D head if untied) + L * (attention + GeGLU + 4 norms [+ 2 QK-norms]) + final norm."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * H * d + 2 * D * K * d + H * d * D + (2 * d if cfg.qk_norm else 0)  # W_q, W_k, W_v, W_o, q/k norms
    if cfg.attention_bias:
        attn += H * d + 2 * K * d + D
    head = 0 if cfg.tie_word_embeddings else V * D
    return V * D + L * (attn + 3 * D * F + 4 * D) + D + head


def matmul_weights(cfg: GemmaConfig) -> int:
    """Weights used in a matrix multiply per token: every projection, plus the output head."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return L * (2 * D * H * d + 2 * D * K * d + 3 * D * F) + V * D


def mean_keys(seq_len: int, window: int | None) -> float:
    """Keys a query attends to, averaged over the positions 0..T-1 of a sequence: min(t + 1, window)."""
    T, W = seq_len, window or seq_len
    if T <= W:
        return (T + 1) / 2
    return (W * (W + 1) / 2 + (T - W) * W) / T


def flops_per_token(cfg: GemmaConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward, matmuls only.

    Forward, per token: 2 FLOPs per matmul weight, plus attention: QK^T and AV each cost 2 * H * d
    FLOPs per (query, key) pair, over (T+1)/2 keys on average for a global layer and fewer for a
    local one once T passes its window (`mean_keys`)."""
    pairs = sum(mean_keys(seq_len, cfg.window(i)) for i in range(cfg.num_hidden_layers))
    attention = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * pairs
    return 3 * (2 * matmul_weights(cfg) + attention)

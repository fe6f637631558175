"""Parameter count and training FLOPs of Llama 3, as closed formulas of the config.

Both are written out in notes/llama3.md and checked by tests against the model itself
(parameters against `sum(p.numel())`, FLOPs against a count of every matmul's shapes).
"""

from __future__ import annotations

from architectures.llama3.config import LlamaConfig


def count_parameters(cfg: LlamaConfig) -> int:
    """V*D embedding (+ V*D head if untied) + L * (attention + SwiGLU + 2 norms) + final norm."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * H * d + 2 * D * K * d + H * d * D  # W_q, W_k, W_v, W_o
    if cfg.attention_bias:
        attn += H * d + 2 * K * d + D
    mlp = 3 * D * F + (2 * F + D if cfg.mlp_bias else 0)  # W_gate, W_up, W_down
    head = 0 if cfg.tie_word_embeddings else V * D
    return V * D + L * (attn + mlp + 2 * D) + D + head


def matmul_weights(cfg: LlamaConfig) -> int:
    """Weights used in a matrix multiply per token: every projection, plus the output head
    (a matmul whether or not it shares the embedding). The embedding lookup, norms and biases are not."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return L * (2 * D * H * d + 2 * D * K * d + 3 * D * F) + V * D


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward, matmuls only.

    Forward, per token: 2 FLOPs (multiply + add) per matmul weight, plus causal attention:
    QK^T and AV each cost 2 * H * d FLOPs per (query, key) pair, and a causal query at
    position t sees t+1 keys, (T+1)/2 on average: 2 * 2 * H * d * (T+1)/2 per layer.
    """
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1)
    return 3 * (2 * matmul_weights(cfg) + attention)

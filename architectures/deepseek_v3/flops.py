"""Total parameters, active parameters per token and training FLOPs of DeepSeek-V3, as closed
formulas of the config (written out in notes/deepseek-v3.md).

Per layer, with D hidden, H heads, d_c kv_lora_rank, d_q q_lora_rank, d_n / d_r / d_v the
no-RoPE, RoPE and value head widths, F one expert's width, E routed and N_s shared experts, k
routed experts per token:

    MLA    = D d_q + d_q + d_q H (d_n + d_r)     (q-LoRA: W_DQ, its norm, W_UQ/W_QR; or D H (d_n + d_r))
           + D (d_c + d_r) + d_c                 (W_DKV/W_KR and the latent norm)
           + d_c H (d_n + d_v) + H d_v D         (W_UK/W_UV and W_O)
    dense  = 3 D d_ff                            (the first first_k_dense_replace layers)
    MoE    = (E + N_s) 3 D F + D E               (experts and the router; active: k instead of E)

Checked by tests/architectures/deepseek_v3/test_parameters_and_flops.py against `sum(p.numel())`
of built models and against the published totals of DeepSeek-V3 and Kimi K2.
"""

from __future__ import annotations

from architectures.deepseek_v3.config import DeepseekV3Config


def attention_parameters(cfg: DeepseekV3Config) -> int:
    """One MLA layer's weights (and biases, when attention_bias)."""
    D, H, d_c, d_r, d_v = (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                           cfg.v_head_dim)
    d_qk = cfg.qk_head_dim
    if cfg.q_lora_rank is None:
        q = D * H * d_qk
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * d_qk
    kv = D * (d_c + d_r) + d_c + d_c * H * (cfg.qk_nope_head_dim + d_v)
    o = H * d_v * D
    return q + kv + o + _attention_biases(cfg)


def _attention_biases(cfg: DeepseekV3Config) -> int:
    """Biases of q_a_proj, kv_a_proj_with_mqa and o_proj (none in DeepSeek-V3 or Kimi K2)."""
    if not cfg.attention_bias:
        return 0
    return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.hidden_size


def _expert(cfg: DeepseekV3Config) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size  # W_gate, W_up, W_down of one expert


def ffn_parameters(cfg: DeepseekV3Config, layer_idx: int, active: bool = False) -> int:
    """Layer i's feed-forward: a dense SwiGLU, or (E or k) routed + N_s shared experts and a router."""
    if not cfg.is_moe(layer_idx):
        return 3 * cfg.hidden_size * cfg.intermediate_size
    routed = cfg.num_experts_per_tok if active else cfg.n_routed_experts
    return (routed + cfg.n_shared_experts) * _expert(cfg) + cfg.hidden_size * cfg.n_routed_experts


def _count(cfg: DeepseekV3Config, active: bool) -> int:
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = sum(attention_parameters(cfg) + ffn_parameters(cfg, i, active) + 2 * D
                 for i in range(cfg.num_hidden_layers))
    head = 0 if cfg.tie_word_embeddings else V * D
    return V * D + layers + D + head


def count_parameters(cfg: DeepseekV3Config) -> int:
    """Every parameter stored (the routing biases are buffers, not parameters; MTP layers not included)."""
    return _count(cfg, active=False)


def active_parameters(cfg: DeepseekV3Config) -> int:
    """Parameters one token touches: all but the E - k routed experts it is not sent to, per MoE
    layer (the whole embedding matrix counted, as for Mixtral's 12.9B)."""
    return _count(cfg, active=True)


def matmul_weights(cfg: DeepseekV3Config) -> int:
    """Weights in a matmul per token: every active projection, the router and the output head;
    the embedding lookup, norms and biases are not."""
    latent_norms = cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    attn = attention_parameters(cfg) - latent_norms - _attention_biases(cfg)
    ffn = sum(ffn_parameters(cfg, i, active=True) for i in range(cfg.num_hidden_layers))
    return cfg.num_hidden_layers * attn + ffn + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: DeepseekV3Config, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward, matmuls only.

    Forward, per token: 2 FLOPs per matmul weight, plus the attention itself in the decompressed
    form training uses: q.k costs 2 H (d_n + d_r) and p.v 2 H d_v per (query, key) pair, and a
    causal query sees (T+1)/2 keys on average: H (d_n + d_r + d_v) (T+1) per layer.
    """
    attention = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1)
    return 3 * (2 * matmul_weights(cfg) + attention)

"""The parameter and FLOPs formulas of architectures/deepseek_v3/flops.py (notes/deepseek-v3.md)
agree with the model itself, and with the totals DeepSeek and Moonshot AI publish."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config, preset
from architectures.deepseek_v3.flops import active_parameters, count_parameters, flops_per_token, matmul_weights


def small(**kw) -> DeepseekV3Config:
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=3, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
                n_routed_experts=6, num_experts_per_tok=2, n_group=3, topk_group=2, max_position_embeddings=64)
    return DeepseekV3Config(**{**base, **kw})


CASES = {"plain": dict(), "q-lora+bias+2-shared+tied": dict(q_lora_rank=16, attention_bias=True, n_shared_experts=2,
                                                            tie_word_embeddings=True),
         "all-dense": dict(first_k_dense_replace=3), "no-dense": dict(first_k_dense_replace=0, n_shared_experts=0)}


@pytest.mark.parametrize("case", CASES)
def test_parameter_formulas_match_the_model(case):
    cfg = small(**CASES[case])
    model = DeepseekV3(cfg)
    assert count_parameters(cfg) == model.num_parameters()
    unused = sum(cfg.n_routed_experts - cfg.num_experts_per_tok for i in range(3) if cfg.is_moe(i))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert active_parameters(cfg) == model.num_parameters() - unused * expert


def test_published_totals():
    """DeepSeek-V3 report: "671B total parameters with 37B activated for each token" (the
    685B on the hub adds the 14B multi-token-prediction module). Kimi K2's model card: "1T total,
    32B activated". The published figures are truncated, not rounded: each count lies between the
    figure and the figure plus one unit of its last digit."""
    v3, k2 = preset("deepseek-v3"), preset("kimi-k2")
    assert count_parameters(v3) == 671_026_404_352 and active_parameters(v3) == 37_552_282_624
    assert 671e9 <= count_parameters(v3) < 672e9 and 37e9 <= active_parameters(v3) < 38e9
    assert count_parameters(k2) == 1_026_408_209_408 and active_parameters(k2) == 32_861_477_888
    assert 1.0e12 <= count_parameters(k2) < 1.1e12 and 32e9 <= active_parameters(k2) < 33e9


def test_flops_formula_matches_counted_matmuls():
    """Count a forward+backward's FLOPs with FlopCounterMode (SDPA's math backend, so attention is
    plain matmuls). Every token goes through exactly k routed experts plus the shared ones, so the
    weight matmuls give exactly 6 x matmul_weights per token; attention's q.k^T costs d_n + d_r and
    p.v d_v per (head, query, key)."""
    cfg = small(q_lora_rank=16, vocab_size=64)
    B, T = 2, 32
    model = DeepseekV3(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 64, (B, T))).sum().backward()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    # The router-weighted sum of a token's k expert outputs is a (1 x k) @ (k x D) product in each MoE layer:
    # 2kD per token forward, x3 with the backward; not a weight matmul, and left out of the formula.
    moe_layers = L - cfg.first_k_dense_replace
    weighting = 3 * moe_layers * 2 * cfg.num_experts_per_tok * cfg.hidden_size * B * T
    full_attention = counter.get_total_flops() - 6 * matmul_weights(cfg) * B * T - weighting
    assert full_attention == 3 * L * 2 * B * H * T * T * (cfg.qk_head_dim + cfg.v_head_dim)
    causal_attention = full_attention * (T + 1) / (2 * T)
    assert flops_per_token(cfg, T) * B * T == pytest.approx(6 * matmul_weights(cfg) * B * T + causal_attention)

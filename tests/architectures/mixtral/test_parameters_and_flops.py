"""The total/active parameter and FLOPs formulas of notes/mixtral.md agree with the model itself."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from architectures.llama3 import Llama3, preset as llama_preset
from architectures.mixtral import Mixtral, MixtralConfig, preset
from architectures.mixtral.flops import active_matmul_weights, active_parameters, count_parameters, flops_per_token


@pytest.mark.parametrize("experts,top_k,tie", [(4, 1, False), (8, 2, True), (3, 3, False)])
def test_parameter_formulas_match_model(experts, top_k, tie):
    cfg = MixtralConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie,
                        num_local_experts=experts, num_experts_per_tok=top_k)
    model = Mixtral(cfg)
    assert count_parameters(cfg) == model.num_parameters()
    assert active_parameters(cfg) == model.active_parameters()


def test_mixtral_8x7b_has_46_7b_parameters_and_12_9b_active():
    # Mistral AI's announcement: "46.7B total parameters but only uses 12.9B parameters per token".
    cfg = preset("mixtral-8x7b")
    assert count_parameters(cfg) / 1e9 == pytest.approx(46.7, abs=0.05)
    assert active_parameters(cfg) / 1e9 == pytest.approx(12.9, abs=0.05)
    assert count_parameters(cfg) == 46_702_792_704 and active_parameters(cfg) == 12_879_925_248


def test_tiny_preset_matches_dense_llama_tiny_in_active_feed_forward_weights():
    """The experiment's premise: 8 experts of 192, top-2, use the weights of Llama's d_ff=384."""
    moe, dense = preset("tiny"), llama_preset("tiny")
    router = moe.num_hidden_layers * moe.hidden_size * moe.num_local_experts
    assert active_parameters(moe) - router == Llama3(dense).num_parameters()


def test_flops_formula_matches_counted_matmuls():
    """Count a forward+backward's FLOPs with FlopCounterMode (SDPA's math backend, so attention is
    plain matmuls). Whatever the routing, every token goes through exactly k experts, so the weight
    matmuls give exactly 6 x active_matmul_weights per token; attention is charged as for Llama."""
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2)
    B, T = 2, 32
    model = Mixtral(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 64, (B, T))).sum().backward()
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    # The router-weighted sum of a token's k expert outputs runs as a (1 x k) @ (k x D) product: 2kD per
    # token forward, x3 with the backward. It is not a weight matmul, and the formula leaves it out.
    weighting = 3 * L * 2 * cfg.num_experts_per_tok * cfg.hidden_size * B * T
    full_attention = counter.get_total_flops() - 6 * active_matmul_weights(cfg) * B * T - weighting
    assert full_attention == 3 * L * (2 * 2 * B * H * T * T * d)
    causal_attention = full_attention * (T + 1) / (2 * T)
    assert flops_per_token(cfg, T) * B * T == pytest.approx(6 * active_matmul_weights(cfg) * B * T + causal_attention)

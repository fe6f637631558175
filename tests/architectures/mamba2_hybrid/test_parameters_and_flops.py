"""The parameter and FLOP formulas of architectures/mamba2_hybrid/flops.py against the models themselves
(`sum(p.numel())`, torch's FLOP counter) and against the published sizes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from architectures.mamba2_hybrid import PRESETS, Mamba2Hybrid, Mamba2HybridConfig, preset
from architectures.mamba2_hybrid.flops import count_parameters, flops_per_token, matmul_weights, ssd_flops


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_formula_equals_the_built_model(name):
    cfg = preset(name)
    with torch.device("meta"):  # no memory: the 8B model costs nothing
        model = Mamba2Hybrid(cfg)
    assert count_parameters(cfg) == model.num_parameters()


def test_published_sizes():
    # state-spaces/mamba2-2.7b is published as 2.7B; nvidia/Nemotron-H-8B-Base-8K as 8B.
    assert count_parameters(preset("mamba2-2.7b")) == 2_702_599_680
    assert round(count_parameters(preset("nemotron-h-8b")) / 1e9) == 8
    assert count_parameters(preset("nemotron-h-8b")) == 8_100_852_736


def test_moe_latent_and_biases_are_counted():
    cfg = Mamba2HybridConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, hybrid_override_pattern="ME*-",
                             mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, use_bias=True,
                             mlp_bias=True, moe_latent_size=16, n_routed_experts=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = Mamba2Hybrid(cfg)
    assert count_parameters(cfg) == model.num_parameters()
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert count_parameters(cfg) - count_parameters(cfg, active=True) == routed * (4 - 2) // 4


@pytest.mark.parametrize("T", [20, 64])
def test_flop_formula_equals_torch_flop_counter(T):
    """Forward FLOPs counted by torch (every mm, bmm and convolution) = the formula's forward.
    The counter's convolution computes K - 1 outputs more per sequence (its padding on the right,
    thrown away), which the formula does not count; attention's SDPA is not counted on the CPU,
    so the pattern has no attention layer (its term is Llama 3's, tested there)."""
    cfg = Mamba2HybridConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, hybrid_override_pattern="ME-M",
                             mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8,
                             intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24)
    model = Mamba2Hybrid(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 64, (1, T)))
    padding = 2 * (cfg.conv_kernel - 1) * cfg.conv_kernel * cfg.conv_dim * 2  # 2 Mamba layers
    # The router-weighted sum of a token's k expert outputs runs as a (1 x k) @ (k x D) product
    # (architectures/common/moe.py): 2kD per token in the one MoE layer, not a weight matmul, left out
    # of the formula as Mixtral's leaves it out.
    weighting = 2 * cfg.num_experts_per_tok * cfg.hidden_size * T
    assert counter.get_total_flops() - padding - weighting == pytest.approx(flops_per_token(cfg, T) / 3 * T, rel=1e-12)
    assert flops_per_token(cfg, T) == 3 * (2 * matmul_weights(cfg) + 2 * (2 * 4 * cfg.conv_dim + ssd_flops(cfg, T)))

"""The parameter and FLOPs formulas of notes/llama3.md agree with the model itself."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from architectures.llama3 import Llama3, LlamaConfig, preset
from architectures.llama3.flops import count_parameters, flops_per_token, matmul_weights


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_parameter_formula_matches_model(tie, bias):
    cfg = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie,
                      attention_bias=bias, mlp_bias=bias)
    assert count_parameters(cfg) == Llama3(cfg).num_parameters()


@pytest.mark.parametrize("name,billions", [("llama-3.2-1b", 1.236), ("llama-3.2-3b", 3.213), ("llama-3.1-8b", 8.030)])
def test_published_model_sizes(name, billions):
    # Meta's model cards: 1.23B, 3.21B, 8.03B parameters.
    assert count_parameters(preset(name)) / 1e9 == pytest.approx(billions, abs=0.001)


def test_flops_formula_matches_counted_matmuls():
    """Count every FLOP of a forward+backward with torch's FlopCounterMode, using SDPA's math
    backend so attention runs as plain matmuls the counter sees. The weight matmuls must give
    exactly 6 x matmul_weights per token; the rest is attention over the full T x T score
    matrix, which our formula charges at the causal fraction (T+1)/(2T)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    B, T = 2, 32
    model = Llama3(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 64, (B, T))).sum().backward()
    total = counter.get_total_flops()
    full_attention = total - 6 * matmul_weights(cfg) * B * T
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    assert full_attention == 3 * L * (2 * 2 * B * H * T * T * d)  # QK^T and AV, forward + 2x backward
    causal_attention = full_attention * (T + 1) / (2 * T)
    assert flops_per_token(cfg, T) * B * T == pytest.approx(6 * matmul_weights(cfg) * B * T + causal_attention)

"""Position interpolation and NTK-aware scaling (architectures/common/rope.py) against transformers'
`ROPE_INIT_FUNCTIONS["linear"]` and `ROPE_INIT_FUNCTIONS["dynamic"]`, and the properties the
long-context note relies on. Tolerance 1e-7 relative: fp32 rounding of the same formula
(transformers builds the exponents from an int64 arange; ours from a float one)."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from architectures.common.rope import (RotaryEmbedding, default_inverse_frequencies, linear_inverse_frequencies,
                                      ntk_inverse_frequencies, rope_parameters)


def llama_config(rope_type: str, factor: float, theta: float, max_position_embeddings: int = 256):
    # head_dim = 256 / 4 = 64
    return transformers.LlamaConfig(hidden_size=256, num_attention_heads=4,
                                    max_position_embeddings=max_position_embeddings, rope_theta=theta,
                                    rope_scaling={"rope_type": rope_type, "factor": factor})


@pytest.mark.parametrize("factor,theta", [(4.0, 10000.0), (8.0, 500000.0), (2.5, 10000.0)])
def test_position_interpolation_matches_transformers_linear(factor, theta):
    want, want_factor = ROPE_INIT_FUNCTIONS["linear"](llama_config("linear", factor, theta))
    got, attention_factor = rope_parameters(64, theta, {"rope_type": "linear", "factor": factor})
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
    assert attention_factor == want_factor == 1.0


@pytest.mark.parametrize("factor,theta", [(4.0, 10000.0), (8.0, 500000.0), (2.0, 10000.0)])
def test_ntk_matches_transformers_dynamic_where_its_factor_equals_ours(factor, theta):
    # transformers' dynamic rule scales the base by (factor * s / M - (factor - 1))^(d/(d-2)) for a
    # sequence of s tokens and max_position_embeddings M; at s = M (2 factor - 1) / factor that is factor.
    M = 256
    s = int(M * (2 * factor - 1) / factor)
    assert factor * s / M - (factor - 1) == factor  # exact for these factors
    want, want_factor = ROPE_INIT_FUNCTIONS["dynamic"](llama_config("dynamic", factor, theta, M), seq_len=s)
    got, attention_factor = rope_parameters(64, theta, {"rope_type": "ntk", "factor": factor})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert attention_factor == want_factor == 1.0


def test_interpolated_angle_at_position_factor_p_equals_the_default_angle_at_p():
    default = RotaryEmbedding(16, 10000.0)
    interpolated = RotaryEmbedding(16, 10000.0, {"rope_type": "linear", "factor": 4.0})
    p = torch.arange(256)[None]  # (1, 256)
    cos, sin = default(p)
    cos4, sin4 = interpolated(4 * p)
    torch.testing.assert_close(cos4, cos, rtol=0, atol=2e-6)  # fp32 angles up to 1020 rad
    torch.testing.assert_close(sin4, sin, rtol=0, atol=2e-6)


def test_ntk_keeps_the_fastest_pair_and_divides_the_slowest_by_the_factor():
    dim, base, factor = 16, 10000.0, 4.0
    theta, ntk = default_inverse_frequencies(dim, base), ntk_inverse_frequencies(dim, base, factor)
    assert ntk[0] == theta[0] == 1.0
    torch.testing.assert_close(ntk[-1], theta[-1] / factor, rtol=1e-6, atol=0)
    ratio = theta / ntk  # factor^(2i/(d-2)): grows geometrically from 1 to factor
    torch.testing.assert_close(ratio, factor ** (torch.arange(dim // 2) * 2 / (dim - 2)), rtol=1e-5, atol=0)
    # Between the two: every frequency is scaled by less than position interpolation scales it.
    assert (ntk >= linear_inverse_frequencies(dim, base, factor)).all()


def test_an_unknown_rope_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="'default', 'linear', 'ntk', 'llama3' and 'yarn'"):
        rope_parameters(16, 10000.0, {"rope_type": "dynamic", "factor": 4.0})

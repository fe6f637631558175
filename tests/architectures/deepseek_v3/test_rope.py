"""RoPE's three frequency rules (architectures/common/rope.py) against transformers' own: the
default, Llama 3.1's and YaRN's inverse frequencies and attention factor, and DeepSeek-V3's
softmax scale. Exact equality of the inverse frequencies is asked where the arithmetic is the
same op for op (1e-7 relative otherwise: fp32 rounding of the same formula)."""

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3RotaryEmbedding,
                                                                  apply_rotary_pos_emb_interleave, yarn_apply_mscale)

from architectures.common.rope import (RotaryEmbedding, apply_rope, deinterleave, rope_parameters, softmax_scale,
                                      yarn_get_mscale)

YARNS = [
    {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
     "mscale_all_dim": 1.0},  # DeepSeek-V3's
    {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
     "mscale_all_dim": 1.0},  # Kimi K2's (beta_fast == beta_slow: a step instead of a ramp)
    {"factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"factor": 8.0, "original_max_position_embeddings": 64, "truncate": False},
]


@pytest.mark.parametrize("yarn", YARNS, ids=["deepseek-v3", "kimi-k2", "mscale-ratio", "untruncated"])
def test_yarn_frequencies_and_factors_match_transformers(yarn):
    cfg = transformers.DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_theta=10000.0,
                                        rope_scaling=dict(yarn, type="yarn"))
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    inv_freq, factor = rope_parameters(64, 10000.0, dict(yarn, rope_type="yarn"))
    torch.testing.assert_close(inv_freq, want_inv_freq, rtol=1e-7, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)
    want_scale = yarn_apply_mscale(cfg.rope_parameters, cfg.qk_head_dim ** -0.5)
    assert softmax_scale(cfg.qk_head_dim, dict(yarn, rope_type="yarn")) == pytest.approx(want_scale, rel=1e-12)
    # The tables: cos/sin scaled by the attention factor, as transformers' rotary module returns them.
    rotary = DeepseekV3RotaryEmbedding(cfg)
    ours = RotaryEmbedding(64, 10000.0, dict(yarn, rope_type="yarn"))
    positions = torch.tensor([[0, 1, 100, 5000, 160000]])
    want_cos, want_sin = rotary(torch.zeros(1), positions)
    cos, sin = ours(positions)
    torch.testing.assert_close(cos[:, :, 0], want_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[:, :, 0], want_sin, rtol=1e-6, atol=1e-6)


def test_deepseek_v3_yarn_sharpens_the_softmax_by_mscale_squared():
    # mscale(40, 1) = 0.1 ln 40 + 1 = 1.3689; the scale of a 192-wide head becomes 1.3689^2 / sqrt(192).
    m = 0.1 * math.log(40) + 1
    assert yarn_get_mscale(40.0, 1.0) == pytest.approx(m)
    assert softmax_scale(192, dict(YARNS[0], rope_type="yarn")) == pytest.approx(m * m / math.sqrt(192))
    assert softmax_scale(192, None) == 192 ** -0.5


def test_default_and_llama3_frequencies_match_transformers():
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0)
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0]
    torch.testing.assert_close(rope_parameters(64, 500000.0, None)[0], want, rtol=0, atol=0)
    llama31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0,
                                   rope_scaling=dict(llama31, rope_type="llama3"))
    want, factor = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    got, ours = rope_parameters(64, 500000.0, dict(llama31, rope_type="llama3"))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
    assert ours == factor == 1.0


def test_interleaved_rope_equals_transformers_interleaved_rotation():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)  # (B, heads, T, d_r)
    angles = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.3, 0.05, 0.001])  # (T, d_r/2)
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
    want_q, want_k = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    # ours works in (B, T, heads, d) with cos/sin of (B, T, 1, d)
    got_q = apply_rope(deinterleave(q.transpose(1, 2)), cos[:, :, None], sin[:, :, None]).transpose(1, 2)
    got_k = apply_rope(deinterleave(k.transpose(1, 2)), cos[:, :, None], sin[:, :, None]).transpose(1, 2)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)

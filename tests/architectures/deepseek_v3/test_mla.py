"""Multi-head latent attention: what it caches, and that attending in the latent space ("absorbed")
is the same function as decompressing per-head keys and values.

The reference is our own explicit form (itself checked against transformers in
test_matches_transformers.py). Absorbed and explicit differ only in summation order: in fp32 the
outputs agree within 1e-5 and greedy tokens are identical.
"""

import pytest
import torch

from architectures.common.cache import LatentSpec, bytes_per_token
from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config, preset
from architectures.deepseek_v3.model import MultiHeadLatentAttention
from inference.sampling import generate
from inference.kv_cache import NaiveKVCache
from inference.sampling import SamplingParams


def tiny(**kw) -> DeepseekV3Config:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                initializer_range=0.2, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32,
                                                     "mscale": 0.707, "mscale_all_dim": 1.0})
    return DeepseekV3Config(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekV3(tiny()).eval()


def test_each_layer_caches_one_latent_row_of_d_c_plus_d_r(model):
    cfg = model.config
    assert model.cache_specs() == [LatentSpec(24 + 8, value_width=24)] * 2
    # Per token and layer: 32 numbers, where full attention would keep K and V: 2 * H * (d_n + d_r) = 192.
    assert bytes_per_token(model.cache_specs(), 4) == 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_deepseek_v3_caches_576_numbers_per_token_and_layer():
    """d_c + d_r = 512 + 64, where multi-head attention with the same heads would cache
    H * (d_n + d_r) + H * d_v = 128 * 192 + 128 * 128 = 40,960 (notes/deepseek-v3.md)."""
    with torch.device("meta"):
        attn = MultiHeadLatentAttention(preset("deepseek-v3"), 0)
    assert attn.cache_spec() == LatentSpec(576, value_width=512)  # values: c_kv, the row's first 512


def test_the_cache_holds_the_normalised_latent_and_the_rotated_shared_key(model):
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    cache = NaiveKVCache.for_model(model, 1, 16)
    seen = {}
    attn = model.model.layers[0].self_attn
    hook = attn.kv_a_layernorm.register_forward_hook(lambda m, args, out: seen.setdefault("c_kv", out))
    with torch.no_grad():
        model.hidden_states(ids, cache)
    hook.remove()
    stored = cache.tokens[0]["latent"][:, :10]  # (1, 10, d_c + d_r)
    torch.testing.assert_close(stored[..., :24], seen["c_kv"], rtol=0, atol=0)
    # The RoPE part: W_KR h, rotated by its position (computed here independently of the layer).
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k_r = attn.kv_a_proj_with_mqa(h)[..., 24:][:, :, None]
        cos, sin = model.model.rotary_emb(torch.arange(10)[None])
        torch.testing.assert_close(stored[..., 24:], attn.rope(k_r, cos, sin)[:, :, 0], rtol=0, atol=0)
    assert set(cache.tokens[0]) == {"latent"}, "MLA must never cache per-head keys or values"


def test_absorbed_attention_equals_decompressed_attention(model):
    """One layer, a cache holding 12 tokens and 5 new queries: W_UK folded into the query and W_UV
    applied after the softmax give the output of decompressing every cached key and value."""
    attn: MultiHeadLatentAttention = model.model.layers[1].self_attn
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    cache = NaiveKVCache.for_model(model, 2, 17)
    rope = model.model.rotary_emb(torch.arange(17)[None])
    with torch.no_grad():
        cache.positions(2, 12, "cpu")
        attn(x[:, :12], tuple(t[:, :12] for t in rope), cache)
        cache.advance(12)
        cache.positions(2, 5, "cpu")
        new = tuple(t[:, 12:] for t in rope)
        attn.decompress_prefill = True
        explicit = attn(x[:, 12:], new, cache)
        attn.decompress_prefill = False
        absorbed = attn(x[:, 12:], new, cache)
        no_cache = attn(x, rope, None)[:, 12:]
    attn.decompress_prefill = True
    torch.testing.assert_close(absorbed, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(absorbed, no_cache, rtol=1e-5, atol=1e-5)
    assert (absorbed - explicit).abs().max() > 0, "the two paths should really be different computations"


@pytest.mark.parametrize("decompress_prefill", [True, False], ids=["decompressed-prefill", "absorbed-everywhere"])
def test_cached_greedy_tokens_equal_uncached_ones(model, decompress_prefill):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    expected = generate(model, prompt, greedy, use_cache=False)
    try:
        for layer in model.model.layers:
            layer.self_attn.decompress_prefill = decompress_prefill
        assert generate(model, prompt, greedy, use_cache=True) == expected
    finally:
        for layer in model.model.layers:
            layer.self_attn.decompress_prefill = True

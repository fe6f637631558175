"""The seams a new family plugs into: per-layer blocks, the hidden-state/head split, cache
declarations and the registry.

A stub family built here mixes three kinds of layer, chosen per layer as a real family would:
Llama's grouped-query attention (caches K and V), a toy latent attention (caches one latent
vector per token and recomputes K and V from it, the shape of DeepSeek's MLA) and a layer that
keeps nothing. The reference is the model without any cache (`use_cache=False` recomputes the
whole sequence each step); greedy tokens through the naive cache and the paged engine must be
identical to it, in fp32 with spread-out logits (initializer_range=0.2), where the ~1e-7
rounding differences between cache layouts cannot flip an argmax.
"""

import math

import pytest
import torch
from torch import nn

from architectures import registry
from architectures.common.attention import causal_attention, grouped_attention
from architectures.common.cache import KVSpec, LatentSpec, bytes_per_token
from architectures.common.decoder import CausalLM
from architectures.llama3 import Llama3, LlamaConfig
from architectures.llama3.model import Attention, RotaryEmbedding, SwiGLU
from inference.batched import generate_batch
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import generate
from inference.kv_cache import NaiveKVCache
from inference.kv_pool import PagedKVPool
from inference.sampling import SamplingParams


class LatentAttention(nn.Module):
    """Caches c = W_c x (width r) per token; keys and values are W_k c and W_v c, recomputed on read."""

    def __init__(self, cfg, layer_idx, rank=8):
        super().__init__()
        self.layer_idx, self.H, self.d = layer_idx, cfg.num_attention_heads, cfg.head_dim
        self.compress = nn.Linear(cfg.hidden_size, rank, bias=False)
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.d, bias=False)
        self.k_up = nn.Linear(rank, self.H * self.d, bias=False)
        self.v_up = nn.Linear(rank, self.H * self.d, bias=False)
        self.o_proj = nn.Linear(self.H * self.d, cfg.hidden_size, bias=False)
        self.scale = 0.5 / math.sqrt(self.d)  # not 1/sqrt(d): the layer's own scale must be the one used

    def cache_spec(self):
        return LatentSpec(self.compress.out_features)

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.d)
        c = self.compress(x)  # (B, T, r)
        if cache is None:
            k, v = self.k_up(c).view(B, T, self.H, self.d), self.v_up(c).view(B, T, self.H, self.d)
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale).transpose(1, 2)
        else:
            cache.write(self.layer_idx, latent=c)
            view = cache.read(self.layer_idx)
            lat = view.tensors["latent"]  # (Bq, S, r)
            k = self.k_up(lat).view(*lat.shape[:2], self.H, self.d)
            v = self.v_up(lat).view(*lat.shape[:2], self.H, self.d)
            out = view.unpack(grouped_attention(view.pack(q), k, v, view.mask, self.scale))
        return self.o_proj(out.reshape(B, T, -1))


class Nothing(nn.Module):
    """A token mixer that mixes nothing and caches nothing (a feed-forward-only layer)."""

    def cache_spec(self):
        return None

    def forward(self, x, rope, cache=None):
        return torch.zeros_like(x)


class Patchwork(CausalLM):
    """Layer i: GQA, latent attention, nothing, GQA, ... ; a SwiGLU in every layer."""

    config_class = LlamaConfig

    def make_mixer(self, cfg, i):
        return [Attention(cfg, i), LatentAttention(cfg, i), Nothing()][i % 3]

    def make_ffn(self, cfg, i):
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def make_rotary(self, cfg):
        return RotaryEmbedding(cfg)


@pytest.fixture(scope="module")
def patchwork():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return Patchwork(cfg).eval()


def test_layers_declare_what_they_cache(patchwork):
    assert patchwork.cache_specs() == [KVSpec(2, 16), LatentSpec(8), None, KVSpec(2, 16)]
    # per token: K and V of 2 heads x 16 in two layers, a latent of 8 in one, nothing in one
    assert bytes_per_token(patchwork.cache_specs(), 4) == (2 * 2 * 2 * 16 + 8) * 4


def test_paged_pool_allocates_nothing_for_a_layer_that_keeps_nothing(patchwork):
    pool = PagedKVPool.for_model(patchwork, num_blocks=10, block_size=4)
    assert pool.layer(2) == {}
    assert set(pool.layer(0)) == {"k", "v"} and set(pool.layer(1)) == {"latent"}
    assert pool.layer(0)["k"].shape == (11, 4, 2, 16) and pool.layer(1)["latent"].shape == (11, 4, 8)
    assert pool.nbytes() == 11 * PagedKVPool.bytes_per_block(patchwork, 4)
    naive = NaiveKVCache.for_model(patchwork, batch_size=2, capacity=5)
    assert naive.tokens[2] == {} and naive.nbytes() == 2 * 5 * bytes_per_token(patchwork.cache_specs(), 4)


def test_every_cache_generates_what_no_cache_generates_for_mixed_layers(patchwork, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    expected = [generate(patchwork, p, greedy, use_cache=False) for p in prompts]
    assert [generate(patchwork, p, greedy) for p in prompts] == expected
    assert generate_batch(patchwork, prompts, greedy) == expected
    engine = LLMEngine(patchwork, EngineConfig(block_size=4, num_blocks=128))
    assert engine.attention == "gather", "a latent cache cannot go through the K/V decode kernel"
    assert [o.completions[0] for o in engine.generate(prompts, greedy)] == expected


def test_hidden_states_and_head_give_the_logits_of_forward(model):
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        hidden = model.hidden_states(ids)
        assert hidden.shape == (3, 20, model.config.hidden_size)
        torch.testing.assert_close(model.compute_logits(hidden), full, rtol=0, atol=0)
        # Fewer rows change the matmul's blocking, hence fp32 rounding (~1e-6), not the function.
        torch.testing.assert_close(model.compute_logits(hidden[:, -1]), full[:, -1], rtol=1e-5, atol=1e-5)


def test_engine_computes_logits_for_the_last_position_of_each_sequence_only(model, prompts):
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
        engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=3))
    finally:
        hook.remove()
    # 7 prompts, 3 tokens each: the head sees one row per sequence per step, never a prompt token
    assert sum(rows) == len(prompts) * 3 and max(rows) == len(prompts)


def test_registry_knows_each_family_once_and_rejects_unknown_ones():
    assert registry.model_class("llama3") is Llama3
    assert registry.family_for_model_type("mixtral") == "mixtral"
    with pytest.raises(ValueError, match=r"unknown architecture family 'gpt5'.*llama3, mixtral"):
        registry.family("gpt5")


def test_registry_from_pretrained_dispatches_on_model_type(tmp_path, model):
    from architectures.llama3 import save_pretrained

    save_pretrained(model, tmp_path)
    loaded = registry.from_pretrained(tmp_path)
    assert isinstance(loaded, Llama3)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"model_type='bert', which no zoo architecture loads.*'llama'"):
        registry.from_pretrained(tmp_path)

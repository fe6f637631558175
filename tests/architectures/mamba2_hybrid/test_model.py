"""The model against transformers' Mamba2ForCausalLM / NemotronHForCausalLM, and its decoding state.

Logits are compared in fp32 within 1e-4 (the same ops up to summation order); greedy tokens must be
identical. tests/architectures/test_conformance.py runs the shared checks (loading, saving, bad
checkpoints) on the family's row; this file adds what only a state-space family has."""

import pytest
import torch
import transformers

from architectures.common.cache import StateSpec, bytes_per_sequence, bytes_per_token
from architectures.mamba2_hybrid import Mamba2Hybrid, Mamba2HybridConfig, from_pretrained, save_pretrained
from inference.batched import generate_batch
from inference.sampling import generate
from inference.kv_cache import NaiveKVCache
from inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def hf_greedy(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("pattern,n_groups,chunk_size", [("M*-EM", 2, 8), ("MMM", 1, 4), ("-M*M", 1, 3)])
def test_every_position_decoded_through_the_cache_equals_the_full_forward(reference, pattern, n_groups, chunk_size):
    """Prefill 7 tokens (not a multiple of the chunk), then one token at a time: the logits at
    each position are those of one pass over the whole sequence (no cache) and transformers'."""
    ref, ours = reference(pattern=pattern, n_groups=n_groups, chunk_size=chunk_size)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    cache = NaiveKVCache.for_model(ours, 2, 19)
    with torch.no_grad():
        full = ours(ids)
        torch.testing.assert_close(full, ref(ids).logits, rtol=1e-4, atol=1e-4)
        steps = [ours(ids[:, :7], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(7, 19)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["M*-EM", "MM"])
def test_batched_greedy_generation_equals_transformers_one_prompt_at_a_time(reference, prompts, pattern):
    """generate_batch left-pads the prompts; the padding must not leak into any row's SSM or conv state."""
    ref, ours = reference(pattern=pattern)
    expected = [hf_greedy(ref, p, GREEDY.max_new_tokens) for p in prompts]
    assert generate_batch(ours, prompts, GREEDY) == expected
    assert [generate(ours, p, GREEDY, use_cache=False) for p in prompts] == expected
    assert [generate(ours, p, GREEDY) for p in prompts] == expected


def test_state_shapes_are_the_ones_transformers_caches(reference):
    ref, ours = reference(pattern="MM")
    with torch.no_grad():
        cache = ref(torch.tensor([[1, 2, 3]]), use_cache=True).cache_params
    conv, ssm = cache.layers[0].conv_states[0], cache.layers[0].recurrent_states[0]
    spec = ours.cache_specs()[0]
    assert isinstance(spec, StateSpec) and spec.per_token == {}
    assert spec.per_sequence == {"conv": tuple(conv.shape[1:]), "ssm": tuple(ssm.shape[1:])}
    assert spec.per_sequence == {"conv": (128 + 2 * 2 * 16, 4), "ssm": (8, 16, 16)}  # (H*P + 2*G*N, K), (H, P, N)


def test_decoding_state_does_not_grow_with_length(reference):
    """A pure Mamba-2 keeps nothing per token: its cache holds the same bytes after 10 tokens as after
    200. A hybrid's grows only by its attention layers' K and V."""
    _, mamba = reference(pattern="MM")
    _, hybrid = reference(pattern="M*-EM")

    def state_bytes(model, length):
        cache = NaiveKVCache.for_model(model, 1, length)
        with torch.no_grad():
            model(torch.randint(0, 97, (1, length)), cache=cache)
        held = lambda layers: sum(t.numel() * t.element_size() for d in layers for t in d.values())  # noqa: E731
        return held(cache.states), held(cache.tokens)

    assert state_bytes(mamba, 10) == state_bytes(mamba, 200) == (bytes_per_sequence(mamba.cache_specs(), 4), 0)
    (s10, t10), (s200, t200) = state_bytes(hybrid, 10), state_bytes(hybrid, 120)
    assert s10 == s200 and t200 - t10 == 110 * bytes_per_token(hybrid.cache_specs(), 4) == 110 * 2 * 2 * 16 * 4


def test_our_hybrid_checkpoint_loads_in_transformers_nemotron_h(tmp_path):
    """Every letter, and a MoE with a latent projection: save_pretrained writes what
    NemotronHForCausalLM loads into the same function (the per-expert hub layout included)."""
    torch.manual_seed(0)
    ours = Mamba2Hybrid(Mamba2HybridConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=5, hybrid_override_pattern="M*E-M", mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, moe_latent_size=16, max_position_embeddings=64,
        time_step_limit=[0.001, float("inf")], initializer_range=0.2)).eval()
    save_pretrained(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == "NemotronHForCausalLM"
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert from_pretrained(tmp_path).config == ours.config


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match=r"unknown letter\(s\) \['X'\].*'M' Mamba-2"):
        Mamba2HybridConfig(num_hidden_layers=3, hybrid_override_pattern="MX*")
    with pytest.raises(ValueError, match="has 3 letters but num_hidden_layers=4"):
        Mamba2HybridConfig(num_hidden_layers=4, hybrid_override_pattern="M*M")
    with pytest.raises(ValueError, match="mamba_num_heads=6 is not divisible by n_groups=4"):
        Mamba2HybridConfig(mamba_num_heads=6, n_groups=4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        Mamba2HybridConfig(chunk_size=0)
    with pytest.raises(ValueError, match="model_type 'mamba2' has Mamba-2 layers only"):
        Mamba2HybridConfig(model_type="mamba2", num_hidden_layers=2, hybrid_override_pattern="M*")


def test_a_config_json_whose_pattern_disagrees_with_its_layer_count_is_refused(tmp_path, edit_config):
    build_reference(tmp_path, pattern="M*-EM")
    edit_config(tmp_path, num_hidden_layers=4)
    with pytest.raises(ValueError, match="has 5 letters but num_hidden_layers=4"):
        from_pretrained(tmp_path)
    edit_config(tmp_path, num_hidden_layers=5, layers_block_type=["linear_attention", "sliding_attention"])
    with pytest.raises(ValueError, match=r"unknown block types \['sliding_attention'\]"):
        from_pretrained(tmp_path)


def test_a_conv_kernel_that_disagrees_with_config_json_is_named(tmp_path, edit_config):
    build_reference(tmp_path, pattern="MM")
    edit_config(tmp_path, conv_kernel=3)
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.conv1d\.weight has a kernel of width 4 but "
                                         r"config\.json says conv_kernel=3"):
        from_pretrained(tmp_path)


from tests.architectures.mamba2_hybrid.conftest import build_reference  # noqa: E402

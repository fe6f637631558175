"""DeepSeek-V3 is the same function as transformers' DeepseekV3ForCausalLM, and generates the same
tokens through every cache the zoo has.

Tiny random references (conftest.py) cover: queries with and without q-LoRA, YaRN on and off,
interleaved and half-split RoPE channels, 1 and 2 shared experts, 1, 2 and 4 expert groups,
first_k_dense_replace 0 and 1, routed_scaling_factor 1 and 2.5, norm_topk_prob on and off.
Logits must agree within 1e-4 in fp32 (the same ops up to summation order; a wrong expert, scale
or rotation shows at 1e-2 or more). Greedy tokens must be identical to transformers' generate
with our naive cache on and off, in a left-padded batch, and through the paged engine with
prefix caching, also when it must preempt.
"""

import pytest
import torch

from architectures import registry
from architectures.deepseek_v3 import DeepseekV3, from_pretrained, save_pretrained
from inference.batched import generate_batch
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import generate
from inference.sampling import SamplingParams

# The oracle is imported, never skipped: without it these tests must fail, not pass vacuously.
import transformers

VOCAB = 97
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        # mscale != mscale_all_dim: YaRN's attention factor on cos/sin (0.87 here) and the softmax-scale
        # correction both differ from 1, so a wrong one of either shows.
        "mscale": 0.707, "mscale_all_dim": 1.0}


def reference_config(**kw) -> "transformers.DeepseekV3Config":
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=24,
                q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=2, topk_group=1,
                num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128,
                routed_scaling_factor=2.5, bos_token_id=None, eos_token_id=None, initializer_range=0.1)
    base.update(kw)
    if base.get("rope_scaling") is not None:
        base["rope_scaling"] = dict(base["rope_scaling"])  # transformers edits the dict it is given
    return transformers.DeepseekV3Config(**base)


def make_reference(path, seed=0, save_kwargs=None, **kw):
    """A random reference model with perturbed norms, decisive routers and nonzero routing biases
    (a bias that also weighted the experts, or was ignored, would show), saved to `path`."""
    torch.manual_seed(seed)
    ref = transformers.DeepseekV3ForCausalLM(reference_config(**kw)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    ref.save_pretrained(path, **(save_kwargs or {}))
    return ref


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """q-LoRA, YaRN, 2 shared experts, 4 groups of 2 experts (top-2 groups): the richest case."""
    path = tmp_path_factory.mktemp("deepseek-ref")
    ref = make_reference(path, q_lora_rank=16, rope_scaling=YARN, n_shared_experts=2, n_group=4, topk_group=2)
    return ref, path

CASES = {
    "plain": dict(),
    "q-lora+yarn+2-shared+4-groups+no-dense": dict(q_lora_rank=16, rope_scaling=YARN, n_shared_experts=2, n_group=4,
                                                   topk_group=2, first_k_dense_replace=0),
    "half-split-rope+1-group+unnormalised+scale-1": dict(rope_interleave=False, n_group=1, topk_group=1,
                                                         norm_topk_prob=False, routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    ref = make_reference(tmp_path, **CASES[case])
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 40, VOCAB)
    assert expected.std() > 0.3, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers_through_every_cache(reference):
    ref, path = reference
    ours = from_pretrained(path)
    prompts = [[5, 17, 42, 8, 3, 77], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [60, 61, 62, 63, 64]]
    expected = [ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    assert [generate(ours, p, greedy, use_cache=False) for p in prompts] == expected
    assert [generate(ours, p, greedy, use_cache=True) for p in prompts] == expected
    assert generate_batch(ours, prompts, greedy) == expected
    engine = LLMEngine(ours, EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=True))
    assert [o.completions[0] for o in engine.generate(prompts + prompts[:1], greedy)] == expected + expected[:1]
    assert engine.stats.cached_prompt_tokens > 0, "the repeated prompt should reuse its cached latent blocks"
    # 7 blocks of 4 slots hold the longest request (13 + 16 - 1 tokens) but not the batch.
    small = LLMEngine(ours, EngineConfig(block_size=4, num_blocks=7, enable_prefix_caching=True))
    assert [o.completions[0] for o in small.generate(prompts, greedy)] == expected
    assert small.stats.preemptions > 0


def test_our_checkpoint_loads_in_transformers(tmp_path):
    """The converse: what our save_pretrained writes (hub layout, bias included) is a valid
    DeepseekV3ForCausalLM directory, and reads back into the same config."""
    ref = make_reference(tmp_path / "ref", q_lora_rank=16, rope_scaling=YARN)
    ours = from_pretrained(tmp_path / "ref")
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert from_pretrained(tmp_path / "ours").config == ours.config


def test_registry_loads_kimi_k2_model_type(tmp_path, edit_config):
    make_reference(tmp_path)
    edit_config(tmp_path, model_type="kimi_k2")
    assert registry.family_for_model_type("kimi_k2") == "deepseek_v3"
    assert isinstance(registry.from_pretrained(tmp_path), DeepseekV3)


def test_transformers_fused_expert_layout_loads_by_name(tmp_path):
    """transformers 5's in-memory layout (save_original_format=False: mlp.experts.gate_up_proj /
    down_proj stacked) is ours, so it loads without conversion."""
    ref = make_reference(tmp_path, save_kwargs={"save_original_format": False})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path)(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)

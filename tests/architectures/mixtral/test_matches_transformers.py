"""Mixtral is the same function as transformers' MixtralForCausalLM.

Tiny random MixtralForCausalLM models (4 and 8 experts, top-1 and top-2) are saved with
`save_pretrained` (the hub's per-expert layout, which transformers 5 writes by default) and
loaded with our `from_pretrained`. Logits must agree within 1e-4 in fp32 (the same ops up to
summation order; a wrong expert or weight shows up at 1e-2 or more), the load-balancing loss
must equal transformers' `aux_loss` with output_router_logits=True, and greedy generations must
be token-for-token identical, with our KV cache on and off.
"""

import pytest
import torch

# The oracle is imported, never skipped: without it these tests must fail, not pass vacuously.
import transformers

from architectures.mixtral import Mixtral, MixtralConfig, from_pretrained, load_balancing_loss, save_pretrained
from inference.engine import EngineConfig, LLMEngine
from inference.generate import generate
from inference.sampling import SamplingParams

VOCAB = 97


def make_reference(path, experts=8, top_k=2, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=experts, num_experts_per_tok=top_k,
        rope_theta=10000.0,
    )
    ref = transformers.MixtralForCausalLM(cfg).eval()
    # Random init leaves the norms at 1 and the router near uniform; perturb the norms so a swapped
    # norm would show, and scale the router so routing decisions are decisive and differ per token.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(20)
    ref.save_pretrained(path, **save_kwargs)
    return ref


CASES = [(4, 1), (4, 2), (8, 1), (8, 2)]


@pytest.mark.parametrize("experts,top_k", CASES, ids=[f"{e}experts-top{k}" for e, k in CASES])
def test_logits_and_aux_loss_match_transformers(tmp_path, experts, top_k):
    ref = make_reference(tmp_path, experts, top_k)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids, output_router_logits=True)
        logits, router_logits = ours(ids, output_router_logits=True)
    assert logits.shape == (3, 60, VOCAB)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert len(router_logits) == 2 and router_logits[0].shape == (3 * 60, experts)
    for got, want in zip(router_logits, expected.router_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    aux = load_balancing_loss(router_logits, experts, top_k)
    torch.testing.assert_close(aux, expected.aux_loss, rtol=1e-6, atol=1e-6)
    # Every expert is used by some token, so the test exercises all of them.
    used = torch.cat([r.topk(top_k, dim=-1).indices.flatten() for r in router_logits]).unique()
    assert len(used) == experts


@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2)])
def test_greedy_generation_matches_transformers_with_and_without_cache(tmp_path, experts, top_k):
    ref = make_reference(tmp_path, experts, top_k)
    ours = from_pretrained(tmp_path)
    prompt = [5, 17, 42, 8, 3, 77]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                            pad_token_id=0)[0, len(prompt):].tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=30)
    assert generate(ours, prompt, greedy, use_cache=True) == expected
    assert generate(ours, prompt, greedy, use_cache=False) == expected


@pytest.mark.parametrize("layout", ["hub-sharded", "fused-v5"])
def test_sharded_and_fused_checkpoints_load(tmp_path, layout):
    """The hub layout split over shards, and transformers 5's fused in-memory layout
    (save_original_format=False: mlp.experts.gate_up_proj / down_proj), give the same model."""
    kwargs = {"max_shard_size": "40KB"} if layout == "hub-sharded" else {"save_original_format": False}
    ref = make_reference(tmp_path, **kwargs)
    if layout == "hub-sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        from safetensors import safe_open
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    """The converse: what our train script writes is a valid MixtralForCausalLM directory."""
    torch.manual_seed(0)
    ours = Mixtral(MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 num_local_experts=4, num_experts_per_tok=2)).eval()
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.mlp.gate.weight.mul_(20)
    save_pretrained(ours, tmp_path)
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert from_pretrained(tmp_path).config == ours.config


def test_bf16_load_is_close_to_fp32(tmp_path):
    make_reference(tmp_path)
    fp32, bf16 = from_pretrained(tmp_path), from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        # bf16 keeps 8 mantissa bits: logits of order 1 agree to a few hundredths (a token whose
        # top-k is a near tie could switch experts; with the decisive router here none does).
        torch.testing.assert_close(bf16(ids).float(), fp32(ids), rtol=0.05, atol=0.05)


def test_paged_engine_generates_what_transformers_generates(tmp_path):
    """Mixtral through the paged inference engine: prompts of different lengths packed into one
    row per step. Routing is per token, so packing must not change a single token."""
    ref = make_reference(tmp_path, experts=8, top_k=2)
    ours = from_pretrained(tmp_path)
    prompts = [[5, 17, 42, 8, 3, 77], [1, 2, 3], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]]
    expected = [ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    engine = LLMEngine(ours, EngineConfig(num_blocks=64))
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20))
    assert [o.completions[0] for o in outputs] == expected

"""Mixtral's own parts against transformers' MixtralForCausalLM: the router and its load-balancing
loss, transformers 5's fused checkpoint layout, and routing through the paged engine.

What every family must do (logits within 1e-4 for 4 and 8 experts, top-1 and top-2; greedy
generation with the cache on and off; sharded, bf16 and our own checkpoints; bad checkpoints)
is in tests/architectures/test_conformance.py. Here, tiny random MixtralForCausalLM models are
saved with `save_pretrained` and loaded with our `from_pretrained`: the router logits must equal
transformers' within 1e-5 and the load-balancing loss its `aux_loss` (output_router_logits=True)
within 1e-6.
"""

import pytest
import torch

# The oracle is imported, never skipped: without it these tests must fail, not pass vacuously.
import transformers

from architectures.mixtral import from_pretrained, load_balancing_loss
from inference.engine import EngineConfig, LLMEngine
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
def test_router_logits_and_aux_loss_match_transformers(tmp_path, experts, top_k):
    ref = make_reference(tmp_path, experts, top_k)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids, output_router_logits=True)
        logits, router_logits = ours(ids, output_router_logits=True)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert len(router_logits) == 2 and router_logits[0].shape == (3 * 60, experts)
    for got, want in zip(router_logits, expected.router_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    aux = load_balancing_loss(router_logits, experts, top_k)
    torch.testing.assert_close(aux, expected.aux_loss, rtol=1e-6, atol=1e-6)
    # Every expert is used by some token, so the test exercises all of them.
    used = torch.cat([r.topk(top_k, dim=-1).indices.flatten() for r in router_logits]).unique()
    assert len(used) == experts


def test_fused_checkpoint_layout_loads(tmp_path):
    """transformers 5's fused in-memory layout (save_original_format=False: mlp.experts.gate_up_proj /
    down_proj) gives the same model as the hub layout (which the conformance tests load, sharded too)."""
    ref = make_reference(tmp_path, save_original_format=False)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


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

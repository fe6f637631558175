"""DeepSeekMoE's routing as specified in the DeepSeek-V3 report (section 2.1.2): the bias chooses
experts but does not weight them, a token's experts come from its best topk_group groups only,
and the auxiliary-loss-free bias update moves a planted imbalance toward balance. Also the
config's refusals of routing shapes that cannot work."""

import pytest
import torch

from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config, update_routing_bias
from architectures.deepseek_v3.moe import Router


def router(**kw) -> Router:
    cfg = DeepseekV3Config(**{**dict(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                     topk_group=1), **kw})
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    return r


def test_bias_chooses_the_experts_but_the_weights_are_the_unbiased_affinities():
    r = router(routed_scaling_factor=2.5)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    r.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # forces experts 0 and 1
    with torch.no_grad():
        w, idx = r(x)
        s = torch.sigmoid(x @ r.weight.T)  # (N, E)
    assert (idx.sort(dim=-1).values == torch.tensor([0, 1])).all()
    torch.testing.assert_close(w, 2.5 * s[:, :2][torch.arange(64)[:, None], idx] / s[:, :2].sum(-1, keepdim=True))


def test_experts_come_only_from_the_best_groups():
    # 4 groups of 2; group scores are the sum of each group's two affinities; topk_group=1 picks one group.
    r = router(n_group=4, topk_group=1)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, idx = r(x)
        s = torch.sigmoid(x @ r.weight.T).view(256, 4, 2).sum(-1)  # (N, 4)
        _, free = router(n_group=1, topk_group=1)(x)
    best = s.argmax(-1)  # (N,)
    assert (idx // 2 == best[:, None]).all(), "both experts of a token must lie in its best group"
    assert (free // 2 != free[:, :1] // 2).any(), "without the group limit some tokens do span two groups"


def test_bias_update_moves_a_planted_imbalance_toward_balance():
    r = router()
    r.train()
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        r.weight[:2] += 4 * u  # experts 0 and 1 score high for every token with a component along u
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(4)) + u  # (N, D)
    holder = torch.nn.ModuleList([r])  # update_routing_bias walks a model's modules

    def loads():
        before = r.load.clone()
        with torch.no_grad():
            r(x)
        return r.load - before  # (E,) tokens per expert this step

    first = loads()
    # The planted imbalance: experts 0 and 1 take over 75% of the assignments (25% if balanced).
    assert first[:2].sum() / first.sum() > 0.75
    weight = r.weight.clone()
    for _ in range(300):
        update_routing_bias(holder, gamma=0.01)
        loads()
    update_routing_bias(holder, gamma=0.01)
    last = loads()
    assert last.max() / last.mean() < 1.5, f"loads still unbalanced after 300 updates: {last.tolist()}"
    assert torch.equal(r.weight, weight), "the update touches the bias only, never the router's weights"
    assert r.e_score_correction_bias[:2].max() < r.e_score_correction_bias[2:].min()


def test_bias_stays_fp32_when_the_model_is_cast_to_bf16():
    cfg = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1)
    model = DeepseekV3(cfg).to(torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("fields,message", [
    (dict(n_group=2, topk_group=3), r"topk_group=3 > n_group=2"),
    (dict(n_routed_experts=6, n_group=4, topk_group=1), r"n_routed_experts=6 is not divisible by n_group=4"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3),
     r"num_experts_per_tok=3 is more than the 2 experts that topk_group=1 groups of 2 hold"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim=7 must be even"),
    (dict(rope_scaling={"factor": 4.0}), r"rope_scaling is missing \['original_max_position_embeddings'\]"),
    (dict(rope_scaling={"type": "dynamic", "factor": 4.0}), r"'dynamic' is not supported"),
    (dict(num_key_value_heads=2), r"must equal num_attention_heads"),
], ids=["topk-group", "divisible", "reachable", "odd-rope", "yarn-missing", "rope-type", "kv-heads"])
def test_config_refuses_routing_and_rope_it_cannot_compute(fields, message):
    with pytest.raises(ValueError, match=message):
        DeepseekV3Config(**fields)

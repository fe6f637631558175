"""The grouped dispatch is the obvious masked MoE, made fast; the auxiliary losses are transformers'.

The oracle for the dispatch is `masked_moe_reference` (every expert on every token, weighted
by the routing, E/k times the work); forward and every gradient must agree within 1e-5 in fp32
(different summation order only). The losses are checked against transformers' own
`load_balancing_loss_func` (Mixtral) and `router_z_loss_func` (Switch Transformers).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from architectures.mixtral import Mixtral, MixtralConfig, load_balancing_loss, moe_lm_loss, router_z_loss
from architectures.mixtral.model import SparseMoE, masked_moe_reference, route
from architectures.common.loss import lm_loss


def moe_layer(experts, top_k, seed=0, D=32, Fd=48):
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=D, intermediate_size=Fd, num_local_experts=experts, num_experts_per_tok=top_k)
    moe = SparseMoE(cfg, layer_idx=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


CASES = [(4, 1), (4, 2), (8, 2), (8, 3), (3, 3)]


@pytest.mark.parametrize("experts,top_k", CASES, ids=[f"{e}experts-top{k}" for e, k in CASES])
def test_grouped_dispatch_equals_masked_reference_with_gradients(experts, top_k):
    moe = moe_layer(experts, top_k)
    x = torch.randn(3, 17, 32, requires_grad=True)  # 51 tokens: expert slices of uneven sizes
    grad_out = torch.randn(3, 17, 32)
    results = []
    for fn in (moe, lambda x: masked_moe_reference(moe, x)):
        moe.zero_grad()
        x.grad = None
        y = fn(x)
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in moe.parameters()]))
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip([n for n, _ in moe.named_parameters()], gp, gp_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_expert_that_receives_no_token_is_skipped_and_gets_zero_gradient():
    moe = moe_layer(4, 2)
    x = torch.randn(10, 32)
    top_idx = torch.tensor([[0, 1], [1, 2]] * 5)  # expert 3 is never chosen
    top_w = torch.full((10, 2), 0.5)
    y = moe.experts(x, top_w, top_idx)
    y.sum().backward()
    assert torch.count_nonzero(moe.experts.gate_up_proj.grad[3]) == 0
    assert torch.count_nonzero(moe.experts.down_proj.grad[3]) == 0
    w_gate, w_up = moe.experts.gate_up_proj[1].split(48)
    expert1 = F.linear(F.silu(F.linear(x[:1], w_gate)) * F.linear(x[:1], w_up), moe.experts.down_proj[1])
    w_gate, w_up = moe.experts.gate_up_proj[0].split(48)
    expert0 = F.linear(F.silu(F.linear(x[:1], w_gate)) * F.linear(x[:1], w_up), moe.experts.down_proj[0])
    torch.testing.assert_close(y[:1], 0.5 * expert0 + 0.5 * expert1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped GEMM path runs on CUDA in bf16 only")
def test_grouped_gemm_path_matches_masked_reference_on_gpu():
    """bf16 matmuls with fp32 accumulation in both, summed in different orders: the outputs and
    gradients agree to bf16 rounding, about 1% in relative norm (a wrong expert would be ~100%)."""
    from architectures.common.moe import can_use_grouped_mm

    moe = moe_layer(8, 2, D=256, Fd=512).cuda()
    x = torch.randn(4, 256, 256, device="cuda")
    grad_out = torch.randn(4, 256, 256, device="cuda")
    results = []
    for fn in (moe, lambda x: masked_moe_reference(moe, x)):
        moe.zero_grad()
        xb = x.clone().requires_grad_()
        # Training runs under bf16 autocast with fp32 master weights: that must take the grouped GEMM.
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert can_use_grouped_mm(xb, moe.experts.gate_up_proj)
            y = fn(xb)
        y.float().backward(grad_out)
        results.append((y.float(), xb.grad, moe.experts.gate_up_proj.grad.clone(), moe.gate.weight.grad.clone()))
    for name, got, want in zip(("output", "input grad", "expert grad", "router grad"), *results):
        assert (got - want).norm() / want.norm() < 2e-2, name


def test_routing_weights_are_the_renormalised_top_k_of_the_softmax():
    logits = torch.randn(100, 8)
    w, idx = route(logits, 2)
    p = logits.softmax(-1)
    top = p.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(100))
    # The Mixtral paper writes Softmax(TopK(x W_g)): a softmax over the k kept logits is the same thing.
    torch.testing.assert_close(w, logits.gather(-1, idx).softmax(-1))
    w1, _ = route(logits, 1)
    assert torch.equal(w1, torch.ones(100, 1))  # top-1: the chosen expert's output is not scaled down


def test_top1_router_learns_only_from_the_auxiliary_losses():
    """With k=1 the renormalised weight is exactly 1, a constant: the language-model loss sends no
    gradient to the router (Switch, which keeps the un-renormalised p, does not have this)."""
    model = tiny_mixtral(num_local_experts=4, num_experts_per_tok=1)
    x = torch.randint(0, 40, (2, 16))
    lm_loss(model, (x, torch.roll(x, -1, dims=1)))[0].backward()
    for layer in model.model.layers:
        # d(p/p)/dp = 0 up to fp32 rounding (~1e-11), against expert gradients of ~1e-3.
        assert layer.mlp.gate.weight.grad.abs().max() < 1e-8
        assert layer.mlp.experts.gate_up_proj.grad.abs().max() > 1e-4


@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2), (8, 3)])
def test_load_balancing_loss_equals_transformers(experts, top_k):
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(40, experts, generator=g) * 3 for _ in range(3))
    torch.testing.assert_close(load_balancing_loss(layers, experts, top_k),
                               load_balancing_loss_func(layers, experts, top_k), rtol=1e-6, atol=1e-6)


def test_router_z_loss_equals_switch_transformers():
    layers = tuple(torch.randn(40, 8) * 4 for _ in range(3))
    # Switch Transformers' function takes (groups, tokens, E); its layers are concatenated along tokens.
    expected = router_z_loss_func(torch.cat(layers).unsqueeze(0))
    torch.testing.assert_close(router_z_loss(layers), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("experts,top_k", [(8, 1), (8, 2), (16, 4)])
def test_balanced_router_gives_k_and_collapsed_router_gives_E(experts, top_k):
    """Why transformers' balance loss sits near k, not 1: f_e counts k assignments per token.
    Balanced: f_e = k/E, P_e = 1/E, so E * sum_e f_e P_e = k. Collapsed onto k experts with
    probability 1/k each: f_e = 1 there, P_e = 1/k, so E * k * (1/k) = E."""
    # Token i prefers experts i, i+1, ..., i+k-1 (mod E) equally: cyclic, so f and P are uniform.
    logits = torch.full((experts, experts), -30.0)
    for i in range(experts):
        logits[i, [(i + j) % experts for j in range(top_k)]] = 0.0
    assert load_balancing_loss((logits,), experts, top_k).item() == pytest.approx(top_k, rel=1e-6)
    # A random router over many tokens is close to balanced, so close to k.
    noisy = (torch.randn(20000, experts, generator=torch.Generator().manual_seed(0)) * 0.1,)
    assert load_balancing_loss(noisy, experts, top_k).item() == pytest.approx(top_k, rel=0.02)
    collapsed = torch.full((100, experts), -30.0)
    collapsed[:, :top_k] = 0.0
    assert load_balancing_loss((collapsed,), experts, top_k).item() == pytest.approx(experts, rel=1e-6)


def test_pooled_loss_misses_layers_that_collapse_in_opposite_directions_and_per_layer_catches_them():
    """transformers pools every layer's tokens before the product, so two layers collapsed onto
    different experts look perfectly balanced (k); the per-layer loss sees two collapses (E)."""
    E, k, N = 4, 2, 10
    layer_a = torch.full((N, E), -30.0)
    layer_a[:, [0, 1]] = 0.0  # every token to experts 0 and 1
    layer_b = torch.full((N, E), -30.0)
    layer_b[:, [2, 3]] = 0.0  # every token to experts 2 and 3
    pooled = load_balancing_loss((layer_a, layer_b), E, k)
    torch.testing.assert_close(pooled, load_balancing_loss_func((layer_a, layer_b), E, k))
    assert pooled.item() == pytest.approx(k, rel=1e-6)
    assert load_balancing_loss((layer_a, layer_b), E, k, per_layer=True).item() == pytest.approx(E, rel=1e-6)


def test_per_layer_loss_is_the_mean_of_transformers_loss_on_each_layer():
    layers = tuple(torch.randn(40, 8, generator=torch.Generator().manual_seed(i)) * 3 for i in range(3))
    expected = sum(load_balancing_loss_func((layer,), 8, 2) for layer in layers) / 3
    torch.testing.assert_close(load_balancing_loss(layers, 8, 2, per_layer=True), expected)


def tiny_mixtral(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)
    return Mixtral(MixtralConfig(**{**base, **kw}))


@pytest.mark.parametrize("per_layer", [False, True])
def test_moe_lm_loss_adds_both_auxiliary_losses_when_training_only(per_layer):
    model = tiny_mixtral(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, router_aux_loss_per_layer=per_layer)
    x = torch.randint(0, 40, (2, 16))
    batch = (x, torch.roll(x, -1, dims=1))
    loss, metrics = moe_lm_loss(model, batch)
    _, router_logits = model(x, output_router_logits=True)
    expected = (lm_loss(model, batch)[0] + 0.1 * load_balancing_loss(router_logits, 4, 2, per_layer)
                + 0.01 * router_z_loss(router_logits))
    torch.testing.assert_close(loss, expected)
    for layer in range(2):
        loads = torch.stack([metrics[f"moe/l{layer}/load_e{e}"] for e in range(4)])
        torch.testing.assert_close(loads.sum(), torch.tensor(1.0))  # shares of the N*k assignments
        assert 0 < metrics[f"moe/l{layer}/load_entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6
        assert 0 < metrics[f"moe/l{layer}/router_entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6
    assert set(metrics) >= {"lm_loss", "aux_loss", "z_loss"}
    # Evaluation reports pure cross-entropy, comparable with a dense model's validation loss.
    model.eval()
    val, val_metrics = moe_lm_loss(model, batch)
    torch.testing.assert_close(val, lm_loss(model, batch)[0])
    assert val_metrics == {}


def test_balance_loss_trains_routers_through_probabilities_not_counts():
    model = tiny_mixtral(router_aux_loss_coef=1.0)
    x = torch.randint(0, 40, (2, 16))
    _, router_logits = model(x, output_router_logits=True)
    load_balancing_loss(router_logits, 4, 2).backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is None  # experts are not in its graph

"""Specification of fundamentals.nn: each layer equals torch.nn.functional with the same weights.

Reference: torch.nn.functional (linear, embedding, layer_norm) run by torch.autograd on the
same float64 weights and inputs; tolerance 1e-10 (same formulas, different rounding order).
"""

import pytest
import torch
import torch.nn.functional as F

from fundamentals.autograd import Tensor
from fundamentals.nn import Dropout, Embedding, LayerNorm, Linear, Module, ReLU, Sequential

TOL = dict(rtol=1e-10, atol=1e-10)


def torch_copies(module):
    return {name: p.data.clone().requires_grad_(True) for name, p in module.named_parameters()}


def check_grads(module, ref):
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL, msg=f"gradient of {name}")


def test_linear_equals_F_linear_in_value_and_gradient():
    torch.manual_seed(0)
    layer, x = Linear(5, 3), torch.randn(2, 4, 5, dtype=torch.float64)
    ref, xr = torch_copies(layer), x.clone().requires_grad_(True)
    xt = Tensor(x, requires_grad=True)
    out, expected = layer(xt), F.linear(xr, ref["weight"], ref["bias"])
    torch.testing.assert_close(out.data, expected.detach(), **TOL)
    (out.tanh().sum()).backward()
    expected.tanh().sum().backward()
    check_grads(layer, ref)
    torch.testing.assert_close(xt.grad, xr.grad, **TOL)


def test_linear_init_has_torch_bounds():
    layer = Linear(100, 50)
    assert layer.weight.data.abs().max() <= 0.1 and layer.weight.data.abs().max() > 0.09  # U(-1/sqrt(100), 1/sqrt(100))


def test_embedding_equals_F_embedding_and_sums_gradients_of_repeated_ids():
    torch.manual_seed(0)
    emb, ids = Embedding(7, 4), torch.tensor([[1, 3, 1], [6, 0, 1]])  # id 1 appears three times
    ref = torch_copies(emb)
    out, expected = emb(ids), F.embedding(ids, ref["weight"])
    torch.testing.assert_close(out.data, expected.detach(), **TOL)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    check_grads(emb, ref)
    with pytest.raises(ValueError, match=r"Embedding of 7 rows got ids from 0 to 7"):
        emb(torch.tensor([0, 7]))


def test_layernorm_equals_F_layer_norm_in_value_and_gradient():
    torch.manual_seed(0)
    ln = LayerNorm(6)
    ln.weight.data.normal_()  # non-trivial gamma and beta, so their gradients are checked too
    ln.bias.data.normal_()
    x = torch.randn(3, 2, 6, dtype=torch.float64) * 3 + 1
    ref, xr, xt = torch_copies(ln), x.clone().requires_grad_(True), Tensor(x, requires_grad=True)
    out, expected = ln(xt), F.layer_norm(xr, (6,), ref["weight"], ref["bias"], eps=1e-5)
    torch.testing.assert_close(out.data, expected.detach(), **TOL)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    check_grads(ln, ref)
    torch.testing.assert_close(xt.grad, xr.grad, **TOL)


def test_dropout_keeps_the_expectation_in_training_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    drop, x = Dropout(0.25), Tensor(torch.ones(100_000))
    y = drop(x).data
    assert set(y.unique().tolist()) == {0.0, 1 / 0.75}  # dropped, or kept and scaled by 1/(1-p)
    assert abs((y == 0).double().mean().item() - 0.25) < 0.01  # 4 standard deviations at n=1e5
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match=r"p=1 .*must be in \[0, 1\)"):
        Dropout(1)


def test_module_registers_parameters_of_nested_modules_in_order():
    class Block(Module):
        def __init__(self):
            super().__init__()
            self.norm = LayerNorm(4)
            self.mlp = Sequential(Linear(4, 8), ReLU(), Dropout(0.1), Linear(8, 4))

    block = Block()
    assert [n for n, _ in block.named_parameters()] == [
        "norm.weight", "norm.bias", "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"]
    assert block.num_parameters() == 4 + 4 + 4 * 8 + 8 + 8 * 4 + 4
    block.eval()
    assert not block.mlp[2].training  # eval() reaches every submodule


def test_assigning_before_super_init_is_a_clear_error():
    class Forgetful(Module):
        def __init__(self):
            self.layer = Linear(2, 2)

    with pytest.raises(RuntimeError, match=r"call super\(\).__init__\(\) first"):
        Forgetful()

"""The derivations of notes/fundamentals.md, each checked numerically: the softmax + cross-entropy
gradient, the backward pass's FLOPs, AdamW's first step, and batch normalization."""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fundamentals.autograd import Tensor, cross_entropy
from fundamentals.cnn.batchnorm import batch_norm_2d
from fundamentals.optim import AdamW
from fundamentals.nn import parameter


def test_softmax_cross_entropy_gradient_is_softmax_minus_one_hot():
    # The from-scratch autograd differentiates log_softmax, the indexing and the mean, op by op;
    # the derivation says the result is (softmax(z) - onehot(y)) / N.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    logits = Tensor(z, requires_grad=True)
    cross_entropy(logits, y).backward()
    derived = (torch.softmax(z, dim=-1) - F.one_hot(y, 5).double()) / len(y)
    torch.testing.assert_close(logits.grad, derived, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(7, dtype=torch.float64))  # rows sum to 0


def test_backward_of_a_linear_layer_costs_twice_its_forward():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256, bias=False), torch.nn.Linear(256, 32, bias=False))
    x = torch.randn(16, 64)
    with FlopCounterMode(display=False) as forward:
        out = model(x)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    params = sum(p.numel() for p in model.parameters())
    assert forward.get_total_flops() == 2 * params * len(x)  # one multiply-add per weight per row
    # dX = G W^T and dW = X^T G: two products the size of the forward's. (The first layer's dX is
    # not needed, since x needs no gradient, so it is 4N per row minus that one.)
    first_dx = 2 * 64 * 256 * len(x)
    assert backward.get_total_flops() == 2 * forward.get_total_flops() - first_dx


def test_adamw_first_step_moves_every_weight_by_lr_whatever_its_gradient():
    # With bias correction, m_hat_1 = g and v_hat_1 = g^2, so the step is lr * g / |g| = lr * sign(g).
    p = parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    p.grad = torch.tensor([1e-3, -5.0, 200.0], dtype=torch.float64)
    AdamW([p], lr=0.1, weight_decay=0.5, eps=0.0).step()
    decayed = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * (1 - 0.1 * 0.5)  # decoupled: p (1 - lr wd) first
    torch.testing.assert_close(p.data, decayed - 0.1 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))


def test_batch_norm_equals_torch_in_training_and_evaluation():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.normal_()
    gamma, beta = ref.weight.detach().clone(), ref.bias.detach().clone()
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(3):  # three training batches: outputs and running statistics
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(batch_norm_2d(x, gamma, beta, mean, var, training=True), ref.train()(x))
        torch.testing.assert_close((mean, var), (ref.running_mean, ref.running_var))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(batch_norm_2d(x, gamma, beta, mean, var, training=False), ref.eval()(x))
    out = batch_norm_2d(x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), mean, var, True)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64))  # normalised per channel

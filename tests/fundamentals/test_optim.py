"""Specification of fundamentals.optim: after 100 steps on the same gradients, the parameters
equal torch.optim's (tolerance 1e-6, as asked of the update rule; in float64 they agree to
~1e-14). The schedule equals torch's LinearLR warm-up followed by CosineAnnealingLR.
"""

import math

import pytest
import torch

from fundamentals.nn import parameter
from fundamentals.optim import SGD, Adam, AdamW, warmup_cosine

SETTINGS = [
    (SGD, torch.optim.SGD, dict(lr=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (Adam, torch.optim.Adam, dict(lr=0.01)),
    (Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict(lr=0.003, betas=(0.9, 0.95), weight_decay=0.5)),
]


@pytest.mark.parametrize("ours, theirs, kw", SETTINGS, ids=[f"{s[0].__name__}-{i}" for i, s in enumerate(SETTINGS)])
def test_parameters_equal_torch_optim_after_100_steps(ours, theirs, kw):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    mine = [parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    opt_mine, opt_ref = ours(mine, **kw), theirs(ref, **kw)
    for step in range(100):
        opt_ref.param_groups[0]["lr"] = opt_mine.lr = kw["lr"] * (1 - step / 200)  # a changing lr is followed too
        for p, r in zip(mine, ref):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad, r.grad = grad.clone(), grad.clone()
        opt_mine.step()
        opt_ref.step()
    for p, r in zip(mine, ref):
        torch.testing.assert_close(p.data, r.data, rtol=1e-6, atol=1e-6)


def test_a_parameter_without_a_gradient_is_not_updated():
    a, b = parameter(torch.ones(2)), parameter(torch.ones(2))
    a.grad = torch.ones(2)
    AdamW([a, b], lr=0.1, weight_decay=0.5).step()
    assert b.data.tolist() == [1.0, 1.0] and a.data[0] < 1


def test_an_optimizer_given_no_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match=r"SGD got no parameters: pass model.parameters\(\)"):
        SGD([], lr=0.1)
    gen = (p for p in [parameter(torch.ones(1))])
    Adam(gen)
    with pytest.raises(ValueError, match=r"Adam got no parameters.*generator can be consumed only once"):
        Adam(gen)  # the same generator, already consumed
    with pytest.raises(ValueError, match=r"requires_grad=False"):
        from fundamentals.autograd import Tensor
        SGD([Tensor([1.0])], lr=0.1)


def test_warmup_cosine_equals_torch_linear_warmup_then_cosine_annealing():
    max_lr, min_lr, warmup, total = 1.0, 0.1, 10, 50
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=max_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)], milestones=[warmup])
    for step in range(total + 1):
        assert math.isclose(warmup_cosine(step, max_lr, min_lr, warmup, total), opt.param_groups[0]["lr"],
                            rel_tol=1e-9), f"step {step}"
        opt.step()
        sched.step()
    assert warmup_cosine(total + 100, max_lr, min_lr, warmup, total) == min_lr  # stays at the floor afterwards

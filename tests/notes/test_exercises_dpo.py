"""The answers to the exercises of notes/dpo.md, computed from the code and compared with the hints the note
gives."""

import math

import torch

from training.dpo.loss import dpo_loss, dpo_metrics


def one(x):
    return torch.tensor([float(x)])


def test_the_implicit_rewards_of_one_pair(hints):
    losses, chosen, rejected = dpo_loss(one(-10), one(-15), one(-12), one(-14), beta=0.1)
    m = dpo_metrics(chosen, rejected)
    got = [round(m[k].item(), 4) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")]
    assert got == [0.2, -0.1, 0.3, 1.0]
    assert f"{losses.item():.3f}" == "0.554"
    assert "rewards/chosen 0.2, rewards/rejected -0.1, margin 0.3, accuracy 1; the loss is -log sigma(0.3) = 0.554" \
        in hints("dpo")


def test_where_conservative_dpo_and_ipo_stop_pushing(hints):
    h = torch.linspace(0, 40, 400_001, dtype=torch.float64)  # margins in steps of 1e-4; reference log-probs 0
    zero = torch.zeros_like(h)
    cdpo = dpo_loss(h, zero, zero, zero, beta=0.1, label_smoothing=0.1)[0]
    ipo = dpo_loss(h, zero, zero, zero, beta=0.1, loss_type="ipo")[0]
    best_cdpo, best_ipo = h[cdpo.argmin()].item(), h[ipo.argmin()].item()
    assert abs(best_cdpo - 10 * math.log(9)) < 1e-3 and f"{best_cdpo:.2f}" == "21.97"
    assert abs(best_ipo - 5) < 1e-3
    assert "cDPO stops at beta h = log 9, h = 21.97; IPO at h = 1 / (2 beta) = 5" in hints("dpo")


def test_the_gradient_of_a_pair_already_well_ordered(hints):
    grads = {}
    for loss_type in ("sigmoid", "hinge", "ipo"):
        chosen = one(20).requires_grad_()  # h = 20 with the other three log-probs at 0: beta h = 2
        dpo_loss(chosen, one(0), one(0), one(0), beta=0.1, loss_type=loss_type)[0].sum().backward()
        grads[loss_type] = round(chosen.grad.item(), 4)
    assert grads == {"sigmoid": round(-0.1 * torch.sigmoid(torch.tensor(-2.0)).item(), 4), "hinge": 0.0, "ipo": 30.0}
    assert grads["sigmoid"] == -0.0119
    assert "sigmoid -0.0119 (-0.1 sigma(-2)), hinge 0, IPO +30" in hints("dpo")

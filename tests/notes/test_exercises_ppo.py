"""The answers to the exercises of notes/ppo.md, computed from the code and compared with the hints the note
gives."""

import math

import torch

from training.ppo.loss import gae, kl_penalised_rewards, ppo_value_loss
from training.reward.loss import bradley_terry_loss

LOGPS = torch.tensor([[-1.0, -2.0, -0.5]])
REF_LOGPS = torch.tensor([[-1.5, -2.0, -1.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.8]])


def test_the_bradley_terry_loss_and_its_gradient(hints):
    got = {}
    for gap in (2.0, 0.0):
        chosen, rejected = torch.tensor([gap], requires_grad=True), torch.tensor([0.0], requires_grad=True)
        loss, _ = bradley_terry_loss(chosen, rejected)
        loss.backward()
        got[gap] = (round(loss.item(), 4), round(chosen.grad.item(), 4), round(rejected.grad.item(), 4))
    assert got[2.0] == (round(math.log1p(math.exp(-2)), 4), -0.1192, 0.1192) == (0.1269, -0.1192, 0.1192)
    assert got[0.0] == (round(math.log(2), 4), -0.5, 0.5)
    assert "-log sigma(2) = 0.1269, gradient -sigma(-2) = -0.1192 on the chosen score and +0.1192 on the rejected; " \
        "at gap 0, log 2 = 0.6931 and -0.5 / +0.5" in hints("ppo")


def penalised():
    return kl_penalised_rewards(torch.tensor([1.0]), LOGPS, REF_LOGPS, torch.ones(1, 3, dtype=torch.bool), kl_coef=0.1)


def test_the_kl_folded_into_the_rewards(hints):
    rewards, kl = penalised()
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.5]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.95]]))
    assert abs(rewards.sum().item() - 0.9) < 1e-6
    assert "k1 = (0.5, 0, 0.5), rewards (-0.05, 0, 0.95), 0.9 in all" in hints("ppo")


def test_gae_by_hand(hints):
    rewards, _ = penalised()
    advantages, returns = gae(rewards, VALUES, gamma=1.0, lam=0.95)
    # by hand, backwards: delta_2 = 0.95 - 0.8; delta_1 = 0 + 0.8 - 0.6; delta_0 = -0.05 + 0.6 - 0.5
    a2 = 0.95 - 0.8
    a1 = 0.2 + 0.95 * a2
    a0 = 0.05 + 0.95 * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2]]), atol=1e-6)
    assert torch.allclose(returns, advantages + VALUES)
    assert [f"{x:.4f}" for x in (a0, a1, a2)] == ["0.3754", "0.3425", "0.1500"]
    monte_carlo, _ = gae(rewards, VALUES, gamma=1.0, lam=1.0)
    assert abs(monte_carlo[0, 0].item() - 0.4) < 1e-6
    assert "A = (0.3754, 0.3425, 0.15), returns (0.8754, 0.9425, 0.95); with lambda 1, A_0 = 0.9 - 0.5 = 0.4" \
        in hints("ppo")


def test_where_the_value_clip_stops_the_gradient(hints):
    got = {}
    for target in (1.0, 0.0):
        values = torch.tensor([[0.5]], requires_grad=True)
        loss, metrics = ppo_value_loss(values, torch.tensor([[0.2]]), torch.tensor([[target]]),
                                       torch.ones(1, 1, dtype=torch.bool), clip_value=0.2)
        loss.backward()
        got[target] = (round(loss.item(), 4), round(values.grad.item(), 4), metrics["value_clipfrac"].item())
    assert got == {1.0: (0.18, 0.0, 1.0), 0.0: (0.125, 0.5, 0.0)}
    assert "R = 1: loss 0.5 x 0.36 = 0.18, gradient 0, value_clipfrac 1; R = 0: loss 0.125, gradient 0.5" \
        in hints("ppo")

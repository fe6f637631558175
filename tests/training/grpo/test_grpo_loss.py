"""GRPO's objective (training/grpo/loss.py): the properties that make it a policy gradient.

There is no call-able reference here: TRL computes the same loss inside `GRPOTrainer._compute_loss`,
which needs a model, generation and a whole trainer. So the tests check what the objective must
do, with autograd on a tiny parametrised policy: at ratio 1 with no KL term its gradient is the
REINFORCE-with-baseline gradient (Williams 1992; the group mean is the baseline, GRPO, Shao et
al. 2024, arXiv:2402.03300); the PPO clip (Schulman et al. 2017, arXiv:1707.06347) removes the
gradient exactly where the ratio has moved past 1 +- clip_eps in the advantage's direction;
Schulman's k3 is >= 0, 0 at equality and an unbiased KL estimate; and the batch's tokens are
averaged as DAPO does (Yu et al. 2025, arXiv:2503.14476).
"""

from __future__ import annotations

import pytest
import torch

from training.grpo import check_rewards, group_advantages, grpo_loss, k3

V, T = 5, 4  # a policy over 5 tokens, completions of 4 tokens


def tiny_policy(seed=0):
    """logits (T, V) = features (T, 3) @ W (3, V): a policy with parameters W."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(T, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, V, generator=g, dtype=torch.float64, requires_grad=True)
    return features, w


def completion_logps(features, w, tokens):
    """log pi(o_t) of each token of each completion: (B, T)."""
    logp = (features @ w).log_softmax(-1)  # (T, V)
    return logp.gather(1, tokens.T).T  # (B, T)


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 7.0, 9.0, 11.0])
    a = group_advantages(rewards, 4)
    for g in a.view(2, 4):
        assert abs(float(g.mean())) < 1e-6 and float(g.std()) == pytest.approx(1.0, abs=1e-3)
    # The baseline: a constant added to one group's rewards changes nothing.
    shifted = rewards + torch.tensor([3.0] * 4 + [-100.0] * 4)
    torch.testing.assert_close(group_advantages(shifted, 4), a)
    assert not group_advantages(torch.tensor([2.0, 2.0, 2.0]), 3).any()  # all equal: nothing to learn


def test_at_ratio_one_without_kl_the_gradient_is_reinforce_with_a_group_baseline():
    features, w = tiny_policy()
    g = torch.Generator().manual_seed(1)
    group = 4
    tokens = torch.randint(0, V, (group, T), generator=g)  # one group of 4 sampled completions
    mask = torch.ones(group, T, dtype=torch.bool)
    mask[1, 3] = mask[2, 2:] = False  # completions of different lengths
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])

    logps = completion_logps(features, w, tokens)
    loss, metrics = grpo_loss(logps, logps.detach(), logps.detach(), group_advantages(rewards, group), mask,
                              kl_coef=0.0)
    (grad,) = torch.autograd.grad(loss, w)

    # REINFORCE with a baseline: -(1/N) sum_i (r_i - b) / s * grad log pi(o_i), b and s the group's
    # mean and std, log pi(o_i) the sum over the completion's tokens, N the batch's completion tokens.
    baseline, scale = rewards.mean(), rewards.std() + 1e-4
    logps = completion_logps(features, w, tokens)
    sequence_logps = (logps * mask).sum(dim=1)  # (B,)
    surrogate = -((rewards - baseline) / scale * sequence_logps).sum() / mask.sum()
    (expected,) = torch.autograd.grad(surrogate, w)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert float(metrics["ratio"]) == 1.0 and float(metrics["clip_ratio"]) == 0.0 and float(metrics["kl"]) == 0.0


def test_clipping_removes_the_gradient_exactly_where_the_ratio_went_too_far():
    """Per token, d loss / d log pi: zero where rho > 1 + eps with A > 0 or rho < 1 - eps with A < 0
    (the update already went far enough that way); -rho A / N everywhere else, the unclipped
    term's gradient (also where rho is past the clip against the advantage: that is never capped)."""
    old = torch.zeros(2, 4, dtype=torch.float64)
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9], [1.5, 0.5, 1.1, 0.9]], dtype=torch.float64))
    logps = (old + log_ratio).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, metrics = grpo_loss(logps, old, logps.detach(), advantages, mask, clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    rho = log_ratio.exp()
    expected = -rho * advantages[:, None] / 8
    expected[0, 0] = 0.0  # rho 1.5 > 1.2, A > 0: clipped
    expected[1, 1] = 0.0  # rho 0.5 < 0.8, A < 0: clipped
    torch.testing.assert_close(logps.grad, expected)
    assert float(metrics["clip_ratio"]) == pytest.approx(2 / 8)


def test_k3_is_non_negative_zero_at_equality_and_an_unbiased_kl_estimate():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    assert (k3(a, b) >= 0).all() and not k3(a, a).any()
    # Its expectation over tokens drawn from pi is KL(pi || pi_ref), computed exactly over a vocabulary.
    log_pi, log_ref = torch.randn(V, generator=g).log_softmax(0), torch.randn(V, generator=g).log_softmax(0)
    expected_k3 = (log_pi.exp() * k3(log_pi, log_ref)).sum()
    kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    torch.testing.assert_close(expected_k3, kl)


def test_kl_term_pulls_the_policy_back_to_the_reference():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, metrics = grpo_loss(logps, logps.detach(), ref, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool),
                              kl_coef=1.0)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): positive where logp > ref (descent lowers it), negative where below.
    assert logps.grad[0, 0] > 0 and logps.grad[0, 1] < 0
    assert float(metrics["kl"]) == pytest.approx(float(k3(logps.detach(), ref).mean()))


def test_every_token_of_the_batch_weighs_the_same():
    """DAPO's token-level mean: a completion of 4 tokens counts 4 times one of 1 token, not once each."""
    old = torch.zeros(2, 4)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    logps = torch.zeros(2, 4, requires_grad=True)
    loss, _ = grpo_loss(logps, old, old, torch.tensor([1.0, 1.0]), mask, kl_coef=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(logps.grad, -mask.float() / 5)
    loss, _ = grpo_loss(logps, old, old, torch.tensor([1.0, 1.0]), torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0  # nothing to train on: 0, not 0/0


@pytest.mark.parametrize("rewards,n,message", [
    (torch.tensor([1.0, float("nan"), 0.0]), 3, "completions [1] got [nan]"),
    (torch.tensor([1.0, float("inf")]), 2, "rewards must be finite numbers"),
    (torch.tensor([1.0, 0.0]), 3, "expected one reward per completion, shape (3,), got shape (2,)"),
    (torch.zeros(3, 1), 3, "got shape (3, 1)"),
])
def test_bad_rewards_are_refused(rewards, n, message):
    with pytest.raises(ValueError) as e:
        check_rewards(rewards, n)
    assert message in str(e.value)


def test_check_rewards_accepts_a_list_and_returns_floats():
    assert check_rewards([1, 0, 1], 3).dtype == torch.float32


@pytest.mark.parametrize("rewards,group_size,message", [
    (torch.tensor([1.0, 0.0]), 1, "group_size must be >= 2"),
    (torch.tensor([1.0, 0.0, 1.0]), 2, "3 rewards do not divide into groups of 2"),
    (torch.tensor([1.0, float("nan")]), 2, "rewards must be finite numbers"),
    (torch.zeros(2, 2), 2, "rewards must be a 1-D tensor"),
])
def test_bad_groups_are_refused(rewards, group_size, message):
    with pytest.raises(ValueError) as e:
        group_advantages(rewards, group_size)
    assert message in str(e.value)


def test_bad_loss_arguments_are_refused():
    x, m, a = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2)
    with pytest.raises(ValueError, match="clip_eps must be > 0"):
        grpo_loss(x, x, x, a, m, clip_eps=0.0)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        grpo_loss(x, x, x, a, m, kl_coef=-0.1)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        grpo_loss(x, x, x, a, m.float())
    with pytest.raises(ValueError, match="advantages \\(3,\\)"):
        grpo_loss(x, x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="ref_logps \\(2, 4\\)"):
        grpo_loss(x, x, torch.zeros(2, 4), a, m)

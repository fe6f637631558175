"""PPO's arithmetic (training/ppo/loss.py) against slow loops written here, one episode and one token
at a time, straight from the formulas (GAE: Schulman et al. 2015, arXiv:1506.02438, eq. 16; the
clipped surrogate and the clipped value loss as Huang et al. 2024, arXiv:2403.17031, describe
OpenAI's and TRL's implementations)."""

from __future__ import annotations

import math

import pytest
import torch

from training.ppo.loss import (entropy, explained_variance, gae, kl_penalised_rewards, ppo_policy_loss,
                               ppo_value_loss, whiten)


def random_batch(seed=0, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    # Replies start after prompts of different lengths and end before padding of different lengths.
    for b, (start, end) in enumerate([(0, 9), (2, 7), (3, 4), (1, 9), (4, 8)][:B]):
        mask[b, start:min(end, T)] = True
    return rewards, values, mask


def slow_gae(rewards, values, gamma, lam, mask):
    """Each row's episode is its masked tokens in order: delta_t = r_t + gamma V_{t+1} - V_t with V = 0
    after the last token, A_t = sum_k (gamma lam)^k delta_{t+k}, written as the sum, not the recursion."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        steps = [t for t in range(T) if mask[b, t]]
        r = [float(rewards[b, t]) for t in steps]
        v = [float(values[b, t]) for t in steps] + [0.0]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(steps))]
        for i, t in enumerate(steps):
            a = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(steps) - i))
            adv[b, t], ret[b, t] = a, a + v[i]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (1.0, 0.0), (0.5, 0.3), (0.0, 0.7)])
def test_gae_equals_the_sum_of_discounted_td_errors(gamma, lam):
    rewards, values, mask = random_batch()
    adv, ret = gae(rewards, values, gamma, lam, mask=mask)
    want_adv, want_ret = slow_gae(rewards, values, gamma, lam, mask)
    torch.testing.assert_close(adv, want_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, want_ret, atol=1e-6, rtol=0)


def test_gae_without_a_mask_is_the_whole_row_and_lambda_one_gives_the_monte_carlo_return():
    rewards, values, _ = random_batch(seed=1)
    adv, ret = gae(rewards, values, 1.0, 1.0)
    mc = rewards.flip(1).cumsum(1).flip(1)  # sum of the rewards from t to the end
    torch.testing.assert_close(ret, mc, atol=1e-6, rtol=0)  # lambda = 1: the return ignores the values
    torch.testing.assert_close(adv, mc - values, atol=1e-6, rtol=0)


def test_gae_holes_in_the_mask_are_skipped():
    rewards, values, _ = random_batch(seed=2, B=2, T=6)
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, False, False, False]])
    adv, ret = gae(rewards, values, 0.9, 0.8, mask=mask)
    want_adv, want_ret = slow_gae(rewards, values, 0.9, 0.8, mask)
    torch.testing.assert_close(adv, want_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, want_ret, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,gamma,lam", [("gamma", 1.5, 0.9), ("gamma", -0.1, 0.9), ("lam", 1.0, 1.01),
                                            ("lam", 1.0, float("nan"))])
def test_gae_refuses_gamma_or_lambda_outside_the_unit_interval(name, gamma, lam):
    rewards, values, mask = random_batch()
    with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\]"):
        gae(rewards, values, gamma, lam, mask=mask)


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    _, _, mask = random_batch()
    g = torch.Generator().manual_seed(3)
    logps, ref = -torch.rand(5, 9, generator=g, dtype=torch.float64), -torch.rand(5, 9, generator=g, dtype=torch.float64)
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    rewards, kl = kl_penalised_rewards(scores, logps, ref, mask, kl_coef=0.1)
    for b in range(5):
        steps = [t for t in range(9) if mask[b, t]]
        for t in range(9):
            want = -0.1 * float(logps[b, t] - ref[b, t]) + (float(scores[b]) if t == steps[-1] else 0.0)
            assert float(rewards[b, t]) == pytest.approx(want if t in steps else 0.0, abs=1e-12)
            assert float(kl[b, t]) == pytest.approx(float(logps[b, t] - ref[b, t]) if t in steps else 0.0)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        kl_penalised_rewards(scores, logps, ref, mask, kl_coef=-0.01)


def test_whiten_has_mean_zero_and_unit_variance_on_the_mask():
    rewards, _, mask = random_batch(seed=4)
    w = whiten(rewards * 3 + 7, mask)
    values = w[mask]
    assert abs(float(values.mean())) < 1e-9 and float(values.std()) == pytest.approx(1.0, abs=1e-6)
    assert not w[~mask].any()
    kept = whiten(rewards * 3 + 7, mask, shift_mean=False)
    assert float(kept[mask].mean()) == pytest.approx(float((rewards * 3 + 7)[mask].mean()), abs=1e-9)


def slow_policy_loss(logps, old, adv, mask, eps):
    terms, clipped = [], 0
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if mask[b, t]:
                rho = math.exp(float(logps[b, t] - old[b, t]))
                a = float(adv[b, t])
                plain, clip = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
                terms.append(max(plain, clip))
                clipped += clip > plain
    return sum(terms) / len(terms), clipped / len(terms)


def slow_value_loss(values, old, returns, mask, c):
    terms, clipped = [], 0
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if mask[b, t]:
                v, vo, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
                plain, clip = (v - r) ** 2, (min(max(v, vo - c), vo + c) - r) ** 2
                terms.append(max(plain, clip))
                clipped += clip > plain
    return 0.5 * sum(terms) / len(terms), clipped / len(terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_and_value_losses_equal_the_slow_loops(seed):
    rewards, values, mask = random_batch(seed)
    g = torch.Generator().manual_seed(seed + 10)
    old = -torch.rand(5, 9, generator=g, dtype=torch.float64)
    logps = old + 0.4 * torch.randn(5, 9, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    loss, metrics = ppo_policy_loss(logps, old, rewards, mask, clip_eps=0.2)
    want, want_frac = slow_policy_loss(logps, old, rewards, mask, 0.2)
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert float(metrics["policy_clipfrac"]) == pytest.approx(want_frac, abs=1e-6) and 0 < want_frac < 1

    new_values = values + 0.5 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    returns = torch.randn(5, 9, generator=g, dtype=torch.float64)
    vloss, vmetrics = ppo_value_loss(new_values, values, returns, mask, clip_value=0.2)
    want, want_frac = slow_value_loss(new_values, values, returns, mask, 0.2)
    assert float(vloss) == pytest.approx(want, abs=1e-6)
    assert float(vmetrics["value_clipfrac"]) == pytest.approx(want_frac, abs=1e-6) and 0 < want_frac < 1


def test_the_policy_clip_removes_the_gradient_only_where_the_ratio_went_too_far():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, _ = ppo_policy_loss(logps, old, adv, torch.ones(1, 4, dtype=torch.bool), clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logps)
    # rho 1.5 with A > 0 and rho 0.5 with A < 0 went past the clip the way A pushes: no gradient;
    # the other two keep -A rho / n.
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]], dtype=torch.float64))


def test_explained_variance_and_entropy():
    _, values, mask = random_batch(seed=5)
    assert float(explained_variance(values, values, mask)) == pytest.approx(1.0)
    r = values[mask]
    assert float(explained_variance(torch.full_like(values, float(r.mean())), values, mask)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: log 4 nats
    assert float(entropy(logits, torch.ones(2, 3, dtype=torch.bool))) == pytest.approx(math.log(4), abs=1e-6)


def test_shapes_and_masks_are_checked():
    rewards, values, mask = random_batch()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        gae(rewards, values, 1.0, 0.95, mask=mask.float())
    with pytest.raises(ValueError, match="one shape"):
        ppo_value_loss(values, values[:, :3], values, mask)

"""Specification of fundamentals.vae.

Reference: torch.distributions.kl_divergence(Normal(mu, sigma), Normal(0, 1)) summed over the
latent axis, in float64, to 1e-12 (one closed form against another); the reparameterised
sample's derivatives are checked against their formulas (dz/dmu = 1, dz/dlogvar = eps sigma / 2).
"""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fundamentals.vae import VAE, gaussian_kl, reparameterize


def test_gaussian_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(5, 3, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected, rtol=1e-12, atol=1e-12)
    assert gaussian_kl(torch.zeros(2, 4), torch.zeros(2, 4)).tolist() == [0.0, 0.0]  # q = p: no divergence


def test_reparameterized_sample_is_differentiable_in_mu_and_logvar():
    mu = torch.tensor([[0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[0.2, -0.4]], dtype=torch.float64, requires_grad=True)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    eps = (z - mu) / (0.5 * logvar).exp()  # the noise that was drawn
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, (eps * 0.5 * (0.5 * logvar).exp()).detach())


def test_reparameterized_samples_have_the_posterior_mean_and_spread():
    mu, logvar = torch.full((200_000, 1), 3.0), torch.full((200_000, 1), 2 * torch.tensor(0.5).log().item())
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 3.0) < 0.01 and abs(z.std().item() - 0.5) < 0.01  # ~ 9 standard errors


def test_elbo_is_reconstruction_minus_kl_and_shapes_are_per_image():
    torch.manual_seed(0)
    model = VAE(d=64, hidden=16, z=3)
    x = torch.rand(5, 64)
    parts = model.elbo(x, torch.Generator().manual_seed(0))
    assert all(v.shape == (5,) for v in parts.values())
    torch.testing.assert_close(parts["elbo"], parts["reconstruction"] - parts["kl"])
    assert (parts["kl"] >= 0).all() and (parts["reconstruction"] <= 0).all()  # log-likelihood of [0,1] targets <= 0
    assert model.sample(7).shape == (7, 64)


def test_images_that_are_not_flattened_are_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(B, 64\), got \(2, 8, 8\); flatten"):
        VAE().elbo(torch.zeros(2, 8, 8))

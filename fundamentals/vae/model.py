"""A variational autoencoder: Kingma & Welling, "Auto-Encoding Variational Bayes" (2013, arXiv:1312.6114).

Generative model p(z) = N(0, I), p(x | z) = Bernoulli(sigmoid(decoder(z))) per pixel; the
encoder gives an approximate posterior q(z | x) = N(mu(x), diag(sigma(x)^2)). Training maximises
the evidence lower bound

    log p(x) >= ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))

with one sample z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation trick: the noise
is an input, so the sample is a differentiable function of mu and sigma) for the first term,
and the KL between two Gaussians in closed form for the second (Appendix B of the paper),
checked in tests/fundamentals/test_vae.py against torch.distributions.kl_divergence.

Pixels of the 8x8 digits are scaled to [0, 1] and used as Bernoulli targets, as is usual for
MNIST-like data; for non-binary x this "likelihood" is a cross-entropy, not a normalised
density, so the ELBO here is comparable between runs on these data, not to published MNIST bounds.
Symbols: B batch, D = 64 pixels, Z latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps: a sample of N(mu, sigma^2) whose gradient reaches mu and logvar."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps  # sigma = exp(logvar / 2): logvar is unconstrained, sigma > 0


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, in nats: (B, Z) -> (B,).

    Per dimension, KL = 1/2 (sigma^2 + mu^2 - 1 - log sigma^2): it is 0 exactly when mu = 0 and sigma = 1.
    """
    return 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(-1)


class VAE(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 256, z: int = 8):
        super().__init__()
        self.d, self.z = d, z
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, z)
        self.to_logvar = nn.Linear(hidden, z)
        self.decoder = nn.Sequential(nn.Linear(z, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, d))  # Bernoulli logits of each pixel

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"VAE expects flattened images of shape (B, {self.d}), got {tuple(x.shape)}; "
                             f"flatten with x.reshape(len(x), -1)")
        h = self.encoder(x)  # (B, hidden)
        return self.to_mu(h), self.to_logvar(h)  # (B, Z) each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, Z) -> (B, D) logits

    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image ELBO and its two terms, in nats, (B,) each; maximise `elbo` (minimise its negative)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator)  # one sample per image: unbiased for E_q
        log_px = -F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="none").sum(-1)  # log p(x|z)
        kl = gaussian_kl(mu, logvar)
        return {"elbo": log_px - kl, "reconstruction": log_px, "kl": kl}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the generative model: z ~ N(0, I), then the decoder's pixel means. (n, D) in [0, 1]."""
        z = torch.randn(n, self.z, generator=generator)
        return torch.sigmoid(self.decode(z))

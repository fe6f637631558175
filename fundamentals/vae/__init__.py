"""A variational autoencoder: encoder, reparameterisation, decoder and the ELBO."""

from fundamentals.vae.model import VAE, gaussian_kl, reparameterize

__all__ = ["VAE", "gaussian_kl", "reparameterize"]

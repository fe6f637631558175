"""The training objectives of Stable Diffusion's two stages, each a `loss_fn(model, batch) -> (loss,
metrics)` for the zoo's one training loop (training/trainer.py).

A batch carries its own randomness (the noise and the timesteps are drawn by the batch sampler
from the step's generator), so a resumed or repeated run sees exactly the same losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.utils.wrappers import unwrap


def diffusion_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """DDPM's simplified objective: || target - unet(x_t, t, text) ||^2, x_t the scaled latents noised to
    step t in closed form; the target is eps (or v), per the schedule's prediction_type.

    batch: "latents" (B, 4, h, w) already scaled by the VAE's scaling_factor, "noise" like it, "timesteps"
    (B,) in [0, T), "input_ids" (B, context) the prompts' token ids."""
    pipe = unwrap(model)
    latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
    noisy = pipe.scheduler.add_noise(latents, noise, t)  # (B, 4, h, w)
    text = pipe.text_encoder(batch["input_ids"])  # (B, context, D)
    prediction = pipe.unet(noisy, t, text)  # (B, 4, h, w)
    return F.mse_loss(prediction.float(), pipe.scheduler.target(latents, noise, t).float()), {}


def vae_loss(kl_weight: float):
    """The VAE's objective: mean squared reconstruction error of a sampled latent, plus kl_weight x the
    KL divergence of q(z | x) from N(0, I) (per latent element). A small weight keeps the latent
    nearly deterministic and lets its scale float; the scaling factor fixes the scale afterwards.
    batch: "images" (B, C, H, W) in [-1, 1], "noise" (B, L, h, w) for the reparameterised sample."""
    def loss_fn(vae, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["images"]
        reconstruction, mean, logvar = vae(images, batch["noise"])
        recon = F.mse_loss(reconstruction.float(), images.float())
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        return recon + kl_weight * kl, {"recon": recon.detach(), "kl": kl.detach()}
    return loss_fn

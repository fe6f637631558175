"""Stable Diffusion: a latent diffusion model (VAE, text-conditioned U-Net, CLIP text encoder, DDPM /
DDIM / Euler samplers with classifier-free guidance), read and written in diffusers' layout."""

from architectures.stable_diffusion.config import PRESETS, SDConfig, preset
from architectures.stable_diffusion.pipeline import StableDiffusion, generate
from architectures.stable_diffusion.pretrained import from_pretrained, save_pretrained

__all__ = ["StableDiffusion", "SDConfig", "PRESETS", "preset", "generate", "from_pretrained", "save_pretrained"]

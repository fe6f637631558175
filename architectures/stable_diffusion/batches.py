"""The batch samplers of the two training stages: `sample(split, n, generator) -> batch`, the training
loop's interface (training/trainer.py), each batch a pure function of its generator, noise and
timesteps included, so that a resumed run sees the very batches an uninterrupted one sees.

A batch dict's "labels" are the classes of its images; the loop counts them as the batch's
"tokens", so its tokens/s is images/s.
"""

from __future__ import annotations

from typing import Callable

import torch

from architectures.stable_diffusion.digits import TEMPLATES, Digits, caption
from architectures.stable_diffusion.tokenizer import CLIPTokenizer


def vae_batches(digits: Digits, latent_shape: tuple[int, int, int]) -> Callable:
    """Stage 1: images and the noise of the VAE's reparameterised sample."""
    def sample(split: str, n: int, g: torch.Generator) -> dict:
        images, labels = (digits.train_images, digits.train_labels) if split == "train" else \
            (digits.val_images, digits.val_labels)
        idx = torch.randint(0, len(labels), (n,), generator=g)
        return {"labels": labels[idx], "images": images[idx], "noise": torch.randn((n, *latent_shape), generator=g)}
    return sample


def caption_ids(tokenizer: CLIPTokenizer, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class's captions in every phrasing as ids, (classes, phrasings, context), and the empty prompt's."""
    table = torch.stack([tokenizer([caption(c, k) for k in range(len(TEMPLATES))], context) for c in range(10)])
    return table, tokenizer([""], context)[0]


def diffusion_batches(latents: dict, labels: dict, tokenizer: CLIPTokenizer, context: int, dropout: float,
                      num_train_timesteps: int) -> Callable:
    """Stage 2: scaled latents sampled from q(z | x) ("latents": split -> (mean, std), already times the
    scaling factor), a caption in a random phrasing (the empty prompt with probability `dropout`, which
    is what classifier-free guidance needs), the noise and the timesteps."""
    table, empty = caption_ids(tokenizer, context)

    def sample(split: str, n: int, g: torch.Generator) -> dict:
        mean, std = latents[split]
        idx = torch.randint(0, len(mean), (n,), generator=g)
        y = labels[split][idx]
        ids = table[y, torch.randint(0, table.shape[1], (n,), generator=g)]  # (n, context)
        drop = torch.rand(n, generator=g) < dropout
        ids = torch.where(drop[:, None], empty[None, :], ids)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)  # a fresh sample of q(z | x)
        return {"labels": y, "input_ids": ids, "latents": z, "noise": torch.randn(z.shape, generator=g),
                "timesteps": torch.randint(0, num_train_timesteps, (n,), generator=g)}
    return sample

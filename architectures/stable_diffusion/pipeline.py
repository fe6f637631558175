"""A whole Stable Diffusion: the four models side by side, text -> image with classifier-free guidance.

    pipe = StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler_config)
    images = generate(pipe, ["a photo of a cat"], steps=50, guidance=7.5, sampler="ddim")   # (B, C, H, W) in [0, 1]

Sampling, as diffusers' StableDiffusionPipeline does it (tested to 1e-4 on its DDIM loop):
1. the prompt and the empty prompt through the text encoder: (2B, context, D);
2. z_T ~ N(0, I) * the sampler's initial sigma, (B, 4, h, w);
3. for each of the sampler's steps: eps = unet([z, z], t, [empty, prompt]) in one batch of 2B,
   eps = eps_empty + g (eps_prompt - eps_empty) (classifier-free guidance; g = 1: the prompt's alone,
   g = 0: the empty prompt's alone), one sampler step;
4. the VAE decodes z / scaling_factor to pixels in [-1, 1], shown as [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from architectures.stable_diffusion.config import SchedulerConfig, SDConfig, components
from architectures.stable_diffusion.scheduler import NoiseSchedule, make_sampler
from architectures.stable_diffusion.text_encoder import CLIPTextModel
from architectures.stable_diffusion.tokenizer import BOS, EOS, CLIPTokenizer
from architectures.stable_diffusion.unet import UNet2DConditionModel
from architectures.stable_diffusion.vae import AutoencoderKL


def byte_tokenizer(context: int) -> CLIPTokenizer:
    """A CLIP tokenizer without merges: every byte is a token (514 in all), for a model built from a preset
    before any tokenizer was trained."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1, **{c: 2 + i for i, c in enumerate(alphabet)},
             **{c + "</w>": 2 + len(alphabet) + i for i, c in enumerate(alphabet)}}
    return CLIPTokenizer(vocab, [], context)


class StableDiffusion(nn.Module):
    """The pipeline's trainable parts as one module (so one optimizer, one state dict, one checkpoint),
    with its tokenizer and noise schedule."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler_config: SchedulerConfig, config: SDConfig | None = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        self.scheduler = NoiseSchedule(scheduler_config)
        self.config = config  # the preset it was built from, if any

    @classmethod
    def from_config(cls, cfg: SDConfig, tokenizer: CLIPTokenizer | None = None) -> "StableDiffusion":
        """A randomly initialised pipeline of a preset's sizes (the byte tokenizer when none is given)."""
        tokenizer = tokenizer or byte_tokenizer(cfg.context)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but --vocab-size is {cfg.vocab_size}; "
                             f"raise --vocab-size")
        unet, vae, text, sched = components(cfg)
        return cls(UNet2DConditionModel(unet), AutoencoderKL(vae), CLIPTextModel(text), tokenizer, sched, cfg)

    @property
    def context(self) -> int:
        """The longest prompt in tokens: the tokenizer's padding length, at most the text encoder's positions."""
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the text encoder's last hidden states, (B, context, D)."""
        ids = self.tokenizer(prompts, self.context).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(ids)


def check_guidance(guidance) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number (1: no guidance, 7.5: SD's default), got {guidance!r}")
    if guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1: no guidance), got {guidance}")
    return float(guidance)


@torch.no_grad()
def generate(pipe: StableDiffusion, prompts: list[str], steps: int, guidance: float, sampler: str = "ddim",
             eta: float = 0.0, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             negative_prompt: str = "", output: str = "images",
             callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sample one image per prompt. `latents`: the starting noise (B, 4, h, w), else drawn from `generator`.
    `output`: "images" (B, C, H, W) in [0, 1] or "latents" (the final z, undecoded). `callback(i, z, x0)`
    sees each step's latent and the model's guess of the clean latent."""
    guidance = check_guidance(guidance)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampler_ = make_sampler(sampler, pipe.scheduler, steps, eta)
    device = next(pipe.unet.parameters()).device
    dtype = next(pipe.unet.parameters()).dtype
    # g = 1 is the conditional model alone: no second batch. diffusers also runs the conditional model alone
    # for any g below 1; here g < 1 moves towards the unconditional model, which g = 0 is.
    guided = guidance != 1.0
    text = pipe.encode_prompts(([negative_prompt] * len(prompts) if guided else []) + prompts)  # (B or 2B, M, D)
    size = pipe.unet.config.sample_size
    if latents is None:
        latents = torch.randn((len(prompts), pipe.unet.config.in_channels, size, size), generator=generator,
                              dtype=torch.float32).to(device)
    z = (latents.to(device, torch.float32) * sampler_.init_noise_sigma).to(dtype)  # (B, 4, h, w)
    for i, t in enumerate(sampler_.timesteps):
        inp = torch.cat([z, z]) if guided else z  # (2B, 4, h, w): unconditional and conditional in one batch
        eps = pipe.unet(sampler_.scale_model_input(inp, i), t.to(device), text.to(dtype))
        if guided:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)  # move past the conditional prediction, away from the unconditional
        if callback is not None:
            callback(i, z, guess_x0(pipe, sampler_, eps, z, i))
        z = sampler_.step(eps, i, z, generator)
    if output == "latents":
        return z
    images = pipe.vae.decode(z / pipe.vae.config.scaling_factor)  # (B, C, H, W) in about [-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def guess_x0(pipe: StableDiffusion, sampler, eps: torch.Tensor, z: torch.Tensor, i: int) -> torch.Tensor:
    """The clean latent the model's output at step i implies (what a trajectory figure shows)."""
    sigmas = getattr(sampler, "sigmas", None)
    if sigmas is not None:  # Euler's latent is x_0 + sigma eps, scaled by sqrt(sigma^2 + 1) for the model
        a = 1 / (sigmas[i] ** 2 + 1)
        return pipe.scheduler.x0_and_eps(eps, z * a ** 0.5, a)[0]
    return pipe.scheduler.x0_and_eps(eps, z, pipe.scheduler.alphas_cumprod[int(sampler.timesteps[i])])[0]

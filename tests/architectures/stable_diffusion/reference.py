"""Tiny random reference models (diffusers' and transformers'), and a whole tiny reference pipeline
saved to a directory, for the parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

# The oracles are imported, never skipped: without them these tests must fail, not pass vacuously.
import diffusers
import transformers

from architectures.stable_diffusion.pipeline import byte_tokenizer

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
           norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.18215)
TEXT = dict(vocab_size=514, hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init leaves norms at 1 and some projections at 0; perturb every parameter so that a swapped,
    ignored or misnamed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def reference_unet(**changes) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return randomize(diffusers.UNet2DConditionModel(**{**UNET, **changes}))


def reference_vae(**changes) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    return randomize(diffusers.AutoencoderKL(**{**VAE, **changes}))


def reference_text_encoder(**changes) -> transformers.CLIPTextModel:
    torch.manual_seed(0)
    return randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TEXT, **changes})))


def reference_tokenizer(path: Path) -> transformers.CLIPTokenizer:
    """transformers' CLIPTokenizer over the zoo's byte vocabulary (saved by us, loaded by transformers)."""
    byte_tokenizer(TEXT["max_position_embeddings"]).save_pretrained(path)
    return transformers.CLIPTokenizer.from_pretrained(path)


def reference_pipeline(path: Path) -> diffusers.StableDiffusionPipeline:
    """A tiny random StableDiffusionPipeline (DDIM), saved to `path` with diffusers' save_pretrained."""
    pipe = diffusers.StableDiffusionPipeline(
        vae=reference_vae(), text_encoder=reference_text_encoder(), tokenizer=reference_tokenizer(path / "_tok"),
        unet=reference_unet(cross_attention_dim=TEXT["hidden_size"]),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(path)
    return pipe

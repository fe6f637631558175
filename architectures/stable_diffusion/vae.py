"""AutoencoderKL: Stable Diffusion's VAE, which maps an image to a small latent and back.

The encoder halves the resolution at every level but the last (3 levels: 16x16 -> 4x4), ends in
a bottleneck with self-attention, and outputs, per latent pixel, the mean and log-variance of a
diagonal Gaussian q(z | x). The decoder mirrors it. Diffusion then runs on z * scaling_factor,
a tensor 48x smaller than a 512x512 RGB image in SD 1.x (64x64x4), 4x smaller than a 16x16 grey
digit here (4x4x4); see notes/stable-diffusion.md for why that is the point.

    vae.encode(images) -> (mean, logvar)     (B, C, H, W) -> 2 x (B, L, H/f, W/f)
    vae.decode(latents) -> images            (B, L, H/f, W/f) -> (B, C, H, W)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.stable_diffusion.blocks import Downsample2D, MidBlock2D, ResnetBlock2D, Upsample2D
from architectures.stable_diffusion.config import VAEConfig


class EncoderLevel(nn.Module):
    """diffusers' DownEncoderBlock2D: ResNet blocks, then a stride-2 conv unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)  # (B, C, H, W) -> (B, C, H/2, W/2)
        return x


class DecoderLevel(nn.Module):
    """diffusers' UpDecoderBlock2D: ResNet blocks, then a 2x upsampling unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)  # (B, C, h, w) -> (B, C, 2h, 2w)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, i < n - 1)
                                          for i in range(n)])
        self.mid_block = MidBlock2D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, C_img, H, W) -> (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # ... -> (B, ch[-1], H/f, W/f), f = 2**(levels - 1)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2L, H/f, W/f): mean and log-variance


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock2D(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([DecoderLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, i < n - 1)
                                        for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, L, h, w) -> (B, ch[-1], h, w)
        for block in self.up_blocks:
            x = block(x)  # ... -> (B, ch[0], h*f, w*f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C_img, H, W)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(latent2, latent2, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], (B, C, H, W) -> the mean and log-variance of q(z | x), each (B, L, H/f, W/f)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp keeps exp(logvar) finite, as the reference does

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (unscaled: divide diffusion's by `scaling_factor` first), (B, L, h, w) -> images (B, C, H, W)."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """Reconstruction for training: encode, sample z = mean + std * noise (the mean without noise),
        decode. Returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(images)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar

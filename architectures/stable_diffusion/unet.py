"""UNet2DConditionModel: the noise predictor eps_theta(z_t, t, text).

    unet(latents, timesteps, encoder_hidden_states) -> predicted noise
         (B, 4, h, w)  (B,) or ()  (B, M, D)            (B, 4, h, w)

The timestep becomes a sinusoidal embedding and an MLP (`time_embedding`) that shifts the
channels of every ResNet block. The text enters through the cross-attention of the transformers
(architectures/stable_diffusion/transformer.py) that follow the ResNet blocks of the "CrossAttn"
levels. The down path halves the resolution at every level but the last and keeps every
intermediate map; the up path doubles it back, concatenating those maps (the skip connections)
onto its inputs, so fine detail never has to pass through the coarsest level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from architectures.stable_diffusion.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from architectures.stable_diffusion.config import DOWN_CROSS, UP_CROSS, UNetConfig
from architectures.stable_diffusion.transformer import Transformer2DModel


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim): sin and cos of t at dim/2 frequencies from 1 to 1/max_period, the
    transformer's position encoding applied to the noise level."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / (half - shift))  # (half,)
    angles = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class DownLevel(nn.Module):
    """CrossAttnDownBlock2D (with attentions) or DownBlock2D: ResNet (+ transformer) blocks, then a stride-2
    conv unless it is the last level. Returns the output and every intermediate map (the skips)."""

    def __init__(self, in_ch: int, out_ch: int, temb: int, cfg: UNetConfig, heads: int, cross: bool, downsample: bool):
        super().__init__()
        n, groups = cfg.layers_per_block, cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, groups, cfg.norm_eps)
                                      for i in range(n)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_ch, heads, cfg.cross_attention_dim, cfg.transformer_layers_per_block, groups,
                               cfg.use_linear_projection) for _ in range(n)] if cross else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=1)] if downsample else [])

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[i](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)  # (B, C, H, W) -> (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: layers_per_block + 1 ResNet (+ transformer) blocks, each eating one
    skip map concatenated on the channels, then a 2x upsampling unless it is the last level."""

    def __init__(self, prev_ch: int, out_ch: int, skip_chs: list[int], temb: int, cfg: UNetConfig, heads: int,
                 cross: bool, upsample: bool):
        super().__init__()
        groups = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip, out_ch, temb, groups,
                                                    cfg.norm_eps) for i, skip in enumerate(skip_chs)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_ch, heads, cfg.cross_attention_dim, cfg.transformer_layers_per_block, groups,
                               cfg.use_linear_projection) for _ in skip_chs] if cross else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x, temb, context, skips: list[torch.Tensor], size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C, H, W) + (B, C_skip, H, W) -> (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x, size)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return x


class MidLevel(nn.Module):
    """UNetMidBlock2DCrossAttn: ResNet -> transformer -> ResNet at the coarsest resolution."""

    def __init__(self, ch: int, temb: int, cfg: UNetConfig, heads: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, cfg.cross_attention_dim,
                                                            cfg.transformer_layers_per_block, cfg.norm_num_groups,
                                                            cfg.use_linear_projection)])

    def forward(self, x, temb, context):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), context), temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, heads, n = cfg.block_out_channels, cfg.heads(), len(cfg.block_out_channels)
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList([
            DownLevel(ch[max(i - 1, 0)], ch[i], temb, cfg, heads[i], cfg.down_block_types[i] == DOWN_CROSS, i < n - 1)
            for i in range(n)])
        self.mid_block = MidLevel(ch[-1], temb, cfg, heads[-1])
        # The skip maps the down path leaves, in order: conv_in's, then each level's ResNet outputs and
        # its downsampled map. The up path takes them back from the end.
        skip_chs = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(cfg.layers_per_block + (i < n - 1))]
        up, rch, rheads = [], ch[::-1], heads[::-1]
        for i in range(n):
            takes = [skip_chs.pop() for _ in range(cfg.layers_per_block + 1)]
            up.append(UpLevel(rch[max(i - 1, 0)], rch[i], takes, temb, cfg, rheads[i],
                              cfg.up_block_types[i] == UP_CROSS, i < n - 1))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, timesteps, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = latents.shape[0]
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(b)  # (B,): one noise level each
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.to(latents.dtype))  # (B, 4 * ch[0])
        context = encoder_hidden_states  # (B, M, D)

        x = self.conv_in(latents)  # (B, 4, h, w) -> (B, ch[0], h, w)
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block(x, temb, context)  # each level but the last: (B, c, H, W) -> (B, c', H/2, W/2)
            skips.extend(level_skips)
        x = self.mid_block(x, temb, context)  # (B, ch[-1], h / 2**(n-1), w / 2**(n-1))
        for i, block in enumerate(self.up_blocks):
            # upsample to the size of the skip map the next level starts with (2x, for sizes that divide)
            size = skips[-(cfg.layers_per_block + 2)].shape[2:] if i < len(self.up_blocks) - 1 else None
            x = block(x, temb, context, skips, size)  # each level but the last: (B, c, H, W) -> (B, c', 2H, 2W)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, ch[0], h, w) -> (B, 4, h, w)

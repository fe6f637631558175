"""The convolutional pieces the VAE and the U-Net share: the ResNet block (with an optional timestep
input), 2x down- and up-sampling, and multi-head attention (self- or cross-, with an optional
GroupNorm in front, as the VAE's mid-block uses it).

Module names are diffusers' state-dict names (`norm1`, `conv1`, `time_emb_proj`, `to_q`,
`to_out.0`, `downsamplers.0.conv`, ...), so a published checkpoint loads by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, (+ the projected timestep embedding), GroupNorm -> SiLU -> 3x3 conv,
    added to the input (through a 1x1 conv when the channel count changes). (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            # the timestep conditions every channel with one learned shift: (B, C_out) -> (B, C_out, 1, 1)
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """A 3x3 conv of stride 2: (B, C, H, W) -> (B, C, H/2, W/2). The U-Net pads 1 on every side; the
    VAE's encoder (`padding=0`) pads only the right and bottom edge, as the original LDM code did."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1): one zero column right, one zero row below
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W), or to `size` when given
    (the U-Net's skip connection's size, for inputs not divisible by its total downsampling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention over (B, N, query_dim) queries and (B, M, context_dim)
    keys/values (the queries themselves when no context is given: self-attention).

    `to_out` is a list holding the output projection, so its weights are named `to_out.0` as in the
    published checkpoints (diffusers keeps a dropout at index 1, which has no weights)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False, norm_groups: int | None = None, norm_eps: float = 1e-6):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.group_norm = nn.GroupNorm(norm_groups, query_dim, eps=norm_eps) if norm_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N, inner), (B, M, inner) x 2
        # (B, N, inner) -> (B, heads, N, head_dim)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v: (B, heads, N, head_dim)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, query_dim)

    def forward_image(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE mid-block's self-attention over the pixels of a feature map, with its GroupNorm and
        residual: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C): one token per pixel
        return x + self.forward(tokens).transpose(1, 2).reshape(b, c, h, w)


class MidBlock2D(nn.Module):
    """The VAE's bottleneck: ResNet block -> self-attention over all pixels (one head, as wide as the
    channels) -> ResNet block, at the coarsest resolution: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [Attention(channels, 1, channels, bias=True, norm_groups=groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0].forward_image(x)
        return self.resnets[1](x)

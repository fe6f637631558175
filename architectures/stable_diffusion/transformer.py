"""The U-Net's transformer: where the text enters the image.

A feature map (B, C, H, W) is read as H*W tokens of width C. Each `BasicTransformerBlock` lets the
pixels attend to each other (self-attention), then to the text encoder's hidden states
(cross-attention: queries from the pixels, keys and values from the M prompt tokens), then runs
a GEGLU feed-forward; each step is pre-LayerNorm and residual. `Transformer2DModel` wraps the
blocks with a GroupNorm and 1x1 projections in and out, and adds the input back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.stable_diffusion.blocks import Attention


class GEGLU(nn.Module):
    """A GELU-gated linear unit: one projection to 2 x inner, half of it gating the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4 x dim, then back to dim. `net` is indexed as in the checkpoints: net.0 the GEGLU,
    net.1 a dropout (no weights), net.2 the output projection."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)  # self-attention among the pixels
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)  # cross-attention to the text
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, H*W, dim) pixel tokens; context: (B, M, context_dim) prompt tokens
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)  # each pixel's query reads the prompt's keys and values
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """(B, C, H, W) and text states (B, M, D) -> (B, C, H, W)."""

    def __init__(self, channels: int, heads: int, context_dim: int, layers: int, groups: int, linear_projection: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        project = nn.Linear if linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(layers)])
        self.proj_out = project(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.linear_projection:
            x = self.proj_in(x.flatten(2).transpose(1, 2))  # (B, H*W, C)
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2)  # 1x1 conv, then (B, C, H, W) -> (B, H*W, C)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x).transpose(1, 2).reshape(b, c, h, w)
        else:
            x = self.proj_out(x.transpose(1, 2).reshape(b, c, h, w))  # back to (B, C, H, W), then 1x1 conv
        return x + residual

"""2-D convolution as one matrix product (im2col), and max pooling, in plain torch ops.

A convolution applies the same (C_in * kh * kw) -> C_out linear map at every output position.
im2col gathers, for each output position, the kh*kw*C_in input values under the kernel into one
column; the convolution is then a single matmul of the flattened weight with those columns
(Chellapilla et al., "High Performance Convolutional Neural Networks for Document Processing",
2006; it is how Caffe computed convolutions). Max pooling gathers windows the same way and
takes their maximum. torch autograd differentiates through the gather and the matmul.
Tested in tests/fundamentals/test_cnn.py against F.conv2d and F.max_pool2d, values and
gradients (1e-10 in float64).

Symbols: N batch, C input channels, H, W input size, O output channels, kh, kw kernel size,
s stride, p padding, OH, OW output size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def im2col(x: torch.Tensor, kernel, stride=1, padding=0, pad_value: float = 0.0) -> tuple[torch.Tensor, int, int]:
    """(N, C, H, W) -> columns (N, C, kh, kw, OH, OW): element [n, c, i, j, y, x] is the input
    pixel under kernel offset (i, j) when the kernel sits at output position (y, x)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input of spatial size {h}x{w} (padding {ph},{pw}) is smaller than the {kh}x{kw} kernel")
    x = F.pad(x, (pw, pw, ph, ph), value=pad_value)  # (N, C, H + 2p, W + 2p)
    # One strided slice per kernel offset: kh*kw views instead of a loop over OH*OW positions.
    rows = [torch.stack([x[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] for j in range(kw)], dim=2) for i in range(kh)]
    return torch.stack(rows, dim=2), oh, ow  # (N, C, kh, kw, OH, OW)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) for groups=1, dilation=1, as im2col + matmul."""
    if x.dim() != 4:
        raise ValueError(f"conv2d expects input of shape (N, C, H, W), got {tuple(x.shape)}; "
                         f"add a batch axis with x.unsqueeze(0) or a channel axis with x.unsqueeze(1)")
    o, c, kh, kw = weight.shape
    if x.shape[1] != c:
        raise ValueError(f"conv2d input has {x.shape[1]} channels (shape {tuple(x.shape)} read as (N, C, H, W)) but "
                         f"the weight {tuple(weight.shape)} expects C={c}; a channels-last image (N, H, W, C) needs "
                         f"x.permute(0, 3, 1, 2), a grayscale one (N, H, W) needs x.unsqueeze(1)")
    cols, oh, ow = im2col(x, (kh, kw), stride, padding)  # (N, C, kh, kw, OH, OW)
    cols = cols.reshape(x.shape[0], c * kh * kw, oh * ow)  # (N, C*kh*kw, OH*OW): one column per position
    out = weight.reshape(o, c * kh * kw) @ cols  # (O, C*kh*kw) @ (N, C*kh*kw, OH*OW) -> (N, O, OH*OW)
    if bias is not None:
        out = out + bias[:, None]
    return out.reshape(x.shape[0], o, oh, ow)


def max_pool2d(x: torch.Tensor, kernel, stride=None, padding=0) -> torch.Tensor:
    """F.max_pool2d(x, kernel, stride, padding): the maximum of each window (padding never wins)."""
    if x.dim() != 4:
        raise ValueError(f"max_pool2d expects input of shape (N, C, H, W), got {tuple(x.shape)}")
    cols, oh, ow = im2col(x, kernel, kernel if stride is None else stride, padding, pad_value=float("-inf"))
    return cols.flatten(2, 3).amax(dim=2)  # (N, C, kh*kw, OH, OW) -> (N, C, OH, OW)


class Conv2d(nn.Module):
    """nn.Conv2d's parameters and initialisation, computed by `conv2d` above."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        reference = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)  # for its init only
        self.weight = nn.Parameter(reference.weight.detach().clone())  # (O, C, kh, kw)
        self.bias = nn.Parameter(reference.bias.detach().clone()) if bias else None
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


class MaxPool2d(nn.Module):
    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)

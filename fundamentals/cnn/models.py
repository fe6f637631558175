"""Two image classifiers for scikit-learn's 8x8 digits (1 channel).

`SmallCNN`: two im2col convolutions (fundamentals/cnn/conv.py) with max pooling and a linear
head: LeCun et al.'s LeNet pattern ("Gradient-Based Learning Applied to Document
Recognition", 1998) at digit-sized scale.

`ResNet`: He et al., "Deep Residual Learning for Image Recognition" (2015, arXiv:1512.03385),
the CIFAR variant of section 4.2: a 3x3 stem, stages of basic blocks (two 3x3 conv + batch norm
layers and an identity skip; a 1x1 conv + batch norm on the skip where the shape changes), global
average pooling and one linear layer. Built from torch.nn layers (nn.Conv2d, nn.BatchNorm2d)
for speed; conv.py shows what a convolution computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fundamentals.cnn.conv import Conv2d, MaxPool2d


class SmallCNN(nn.Module):
    def __init__(self, channels: tuple[int, int] = (16, 32), n_classes: int = 10, in_channels: int = 1):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), MaxPool2d(2),  # (N, c1, 4, 4)
            Conv2d(c1, c2, 3, padding=1), nn.ReLU(), MaxPool2d(2),  # (N, c2, 2, 2)
        )
        self.head = nn.Linear(c2 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, n_classes)
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)): the block learns a residual, so a block
    that should do nothing only has to drive its weights to zero."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        # no conv bias: batch norm's shift (beta) would cancel it
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B of the paper) where shapes differ
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2, n_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                # the first block of every stage after the first halves H and W: 8x8 -> 4x4 -> 2x2
                layers.append(BasicBlock(c, w, stride=2 if i > 0 and b == 0 else 1))
                c = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, n_classes)
        if x.dim() != 4 or x.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"ResNet expects images of shape (N, {self.stem[0].in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        h = self.stages(self.stem(x))  # (N, widths[-1], H/4, W/4)
        return self.head(h.mean(dim=(2, 3)))  # global average pooling

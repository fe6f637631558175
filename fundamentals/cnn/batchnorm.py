"""Batch normalization written out (Ioffe & Szegedy 2015, arXiv:1502.03167), read beside the CNN
section of notes/fundamentals.md. `ResNet` uses nn.BatchNorm2d for speed; `batch_norm_2d` is what
it computes, checked against it in tests/fundamentals/test_derivations.py (outputs in training and
evaluation mode, and the running statistics)."""

from __future__ import annotations

import torch


def batch_norm_2d(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, training: bool, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """x: (N, C, H, W); gamma, beta, running_mean, running_var: (C,) -> (N, C, H, W).

    Training: each channel is normalised by the mean and variance of its N*H*W values in this batch,
    and the running statistics move towards them (updated in place). Evaluation: the running
    statistics are used instead, so an image's output no longer depends on the rest of its batch.
    """
    if training:
        mean = x.mean(dim=(0, 2, 3))  # (C,)
        var = x.var(dim=(0, 2, 3), unbiased=False)  # (C,): the batch's own (biased) variance normalises
        n = x.numel() // x.shape[1]
        with torch.no_grad():  # running averages for evaluation: torch keeps the unbiased variance
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
    else:
        mean, var = running_mean, running_var
    x_hat = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)  # mean 0, variance 1
    return gamma[None, :, None, None] * x_hat + beta[None, :, None, None]  # a learned scale and shift

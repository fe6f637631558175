"""Losses built from `Tensor` operations, so their gradients come from the graph, not from a formula.

`cross_entropy` matches torch.nn.functional.cross_entropy with mean reduction (tested in
tests/fundamentals/test_autograd.py to 1e-10, value and gradient).
"""

from __future__ import annotations

import torch

from fundamentals.autograd.tensor import Tensor


def cross_entropy(logits: Tensor, targets) -> Tensor:
    """Mean over the batch of -log softmax(logits)[target]: the negative log-likelihood in nats.

    logits: (N, C) Tensor; targets: (N,) integer class ids (list, numpy array or torch tensor).
    """
    targets = torch.as_tensor(targets.data if isinstance(targets, Tensor) else targets)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, C), got {tuple(logits.shape)}; "
                         f"flatten the leading axes with logits.reshape(-1, C)")
    n, c = logits.shape
    if targets.shape != (n,) or targets.is_floating_point():
        raise ValueError(f"cross_entropy expects integer targets of shape ({n},) for logits of shape ({n}, {c}), "
                         f"got {targets.dtype} of shape {tuple(targets.shape)}")
    if n and (targets.min() < 0 or targets.max() >= c):
        raise ValueError(f"cross_entropy targets must be class ids in [0, {c}), got values from "
                         f"{targets.min().item()} to {targets.max().item()}")
    log_probs = logits.log_softmax(axis=-1)  # (N, C)
    picked = log_probs[torch.arange(n), targets.long()]  # (N,): log p(target) of each row
    return -picked.mean()

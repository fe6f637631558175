"""A from-scratch reverse-mode autograd: `Tensor` records the graph, `backward` walks it."""

from fundamentals.autograd.losses import cross_entropy
from fundamentals.autograd.tensor import Tensor, no_grad, unbroadcast

__all__ = ["Tensor", "cross_entropy", "no_grad", "unbroadcast"]

"""Optimizers and a learning-rate schedule for `fundamentals.nn` modules."""

from fundamentals.optim.optimizers import SGD, Adam, AdamW, Optimizer, warmup_cosine

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "warmup_cosine"]

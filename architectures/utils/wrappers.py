"""The model inside its training wrappers.

DistributedDataParallel keeps the model in `.module` and torch.compile in `._orig_mod`; code that
reads a model's config, its routers or its head goes through `unwrap` to reach the model itself.
"""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model

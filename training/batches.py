"""A training step's batch: drawn as a pure function of (seed, step), cut into this process's
micro-batches, and copied to the device without making the host wait.

A batch is a tensor, or a tuple, list or dict of tensors, whose first dimension is the example.
Because the generator a batch is drawn with depends only on (seed, split, step), a resumed run
and a run on N processes (each taking its slice of the rows) see exactly the batches an
uninterrupted single-process run sees, and every evaluation reads the same validation batches.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def batch_generator(seed: int, split: str, step: int) -> torch.Generator:
    """The RNG a batch is drawn with: a pure function of (seed, split, step)."""
    # Train steps take the even streams and validation batches the odd ones, so they never coincide.
    return torch.Generator().manual_seed((seed * 1_000_003 + 2 * step + (split == "val")) % 2**63)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """Apply fn to every tensor of a batch that is a tensor, or a tuple/list/dict of tensors."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    return type(batch)(map_tensors(fn, v) for v in batch)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of every tensor of a batch."""
    return map_tensors(lambda t: t[start:stop], batch)


def pin_batch(batch: Any, device: torch.device) -> Any:
    """Page-locked host copies, which a GPU copies from asynchronously (no-op for a CPU run)."""
    if device.type != "cuda":
        return batch
    return map_tensors(lambda t: t.pin_memory() if t.device.type == "cpu" else t, batch)


def move_batch(batch: Any, device: torch.device) -> Any:
    """Enqueue the copy to the device; from pinned memory it returns before the copy has run."""
    return map_tensors(lambda t: t.to(device, non_blocking=t.is_pinned()), batch)


def target_tokens(batch: Any) -> int:
    """Tokens a batch trains on when its loss does not count them: the targets y of an (x, y)
    batch, the "labels" or "targets" of a dict batch, else every element of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        key = next((k for k in ("labels", "targets") if k in batch), next(iter(batch)))
        return target_tokens(batch[key])
    return target_tokens(batch[1] if len(batch) == 2 else batch[0])

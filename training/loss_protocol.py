"""How the training loop calls a method's loss: `loss_fn(model, batch) -> (loss, metrics)`,
and the three ways a method extends that call.

- Frozen models, `train(..., frozen={"reference": ref_model})`: models the loss reads but
  nothing trains (DPO's reference, distillation's teacher). Each is moved to the device, cast to
  the trained model's parameter dtype (so both run the same arithmetic under the same autocast: a
  reference that starts as a copy of the model computes exactly what the model computes), put in
  eval mode with requires_grad off, and under FSDP sharded like the trained model (under DDP it
  is only moved). It is in no optimizer and no checkpoint. With `frozen` given, the loop calls
  `loss_fn(model, batch, frozen)`: the third argument maps each name to its prepared model,
  which the loss calls under torch.no_grad().
- `TrainConfig.loss_chunk`: a loss that takes a `chunk_size` keyword (`lm_loss`, `sft_loss`) is
  called with it, and computes the output head and cross-entropy that many tokens at a time.
- Normalising by supervised tokens: a loss whose rows hold different numbers of targets (SFT
  masks the prompt with -100) returns the SUM of its per-token losses and puts how many tokens
  it summed in its metrics under "num_tokens" (`NUM_TOKENS`). The loop then divides the step's
  gradient by the supervised tokens of the whole step, all micro-batches of all processes, so
  every token weighs the same however the rows fall into micro-batches, and it logs that
  token-weighted mean as the loss. A loss that returns a mean (no "num_tokens") is averaged
  over micro-batches, which is the same thing when every row has as many targets (`lm_loss`).
"""

from __future__ import annotations

import functools
import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from training.distributed import Distributed

# The metrics key by which a loss says it returned a SUM over this many supervised tokens.
NUM_TOKENS = "num_tokens"


def with_loss_chunk(loss_fn: Callable, chunk_size: int) -> Callable:
    """The loss called with `chunk_size` (unchanged when it is 0)."""
    if not chunk_size:
        return loss_fn
    if "chunk_size" not in inspect.signature(loss_fn).parameters:
        raise ValueError(f"loss_chunk={chunk_size}: the loss {getattr(loss_fn, '__name__', loss_fn)!r} applies "
                         f"the output head itself and takes no chunk_size; train it with loss_chunk 0")
    return functools.partial(loss_fn, chunk_size=chunk_size)


def prepare_frozen(frozen: Mapping[str, nn.Module], model: nn.Module, device: torch.device,
                   dd: Distributed) -> Mapping[str, nn.Module]:
    """Each frozen model on the device, in the trained model's dtype, in eval mode, without
    gradients, and under FSDP sharded like the trained model. Returns a read-only name -> model map."""
    trained = {id(p) for p in model.parameters()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    ready = {}
    for name, m in frozen.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"frozen[{name!r}] must be an nn.Module, got {type(m).__name__}")
        if any(id(p) in trained for p in m.parameters()):
            raise ValueError(f"frozen model {name!r} shares parameters with the model being trained, so freezing it "
                             f"would freeze the model too; pass a copy (copy.deepcopy(model))")
        m.to(device=device, dtype=dtype)
        m.eval()
        m.requires_grad_(False)
        # FSDP2 shards it like the trained model (each process holds 1/N); DDP has nothing to
        # synchronise for a model without gradients, so under DDP it stays a plain replica.
        if dd.enabled and dd.strategy == "fsdp":
            m = dd.wrap(m)
            # FSDP2 keeps the root's weights (embedding, head) gathered after the forward, for the
            # backward that follows; a frozen model has no backward, so it gives them back at once.
            m.set_reshard_after_forward(True)
        ready[name] = m
    return MappingProxyType(ready)


def call_loss(loss_fn: Callable, model: nn.Module, batch: Any, frozen: Mapping[str, nn.Module] | None):
    """(loss, metrics, supervised tokens or None): the loss function's answer, with the frozen
    models as its third argument when there are any, and NUM_TOKENS taken out of the metrics."""
    loss, metrics = loss_fn(model, batch, frozen) if frozen else loss_fn(model, batch)
    if NUM_TOKENS not in metrics:
        return loss, metrics, None
    metrics = dict(metrics)
    count = metrics.pop(NUM_TOKENS)
    return loss, metrics, torch.as_tensor(count, device=loss.device).detach().float()

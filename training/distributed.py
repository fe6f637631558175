"""Training on several processes under `torchrun`, with PyTorch's own engines: DDP or FSDP2.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; when they are absent everything here is a
no-op, so the same loop runs as one process. NCCL carries GPU runs, gloo CPU runs (tested
in CI with two processes).

- DDP (DistributedDataParallel): every process holds the whole model and optimizer; gradients
  are averaged across processes during backward.
- FSDP2 (`fully_shard`, "PyTorch FSDP", 2023, arXiv:2304.11277): every process holds 1/N of
  each parameter and of its optimizer state; a layer's full weights are all-gathered just
  before it runs and freed after, and gradients are reduce-scattered back to their shards.
  Parameter + gradient + AdamW memory per GPU drops to about 1/N.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the GPU this process owns, or None (cpu / chosen by config)
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> "Distributed":
        if strategy not in STRATEGIES:
            raise ValueError(f"parallel strategy must be one of {STRATEGIES}, got {strategy!r}")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(strategy=strategy)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and os.environ.get("ZOO_DDP_BACKEND", "") != "gloo"
        device = None
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # A collective that waits longer than this raises (naming the operation) instead of
            # hanging; ZOO_DIST_TIMEOUT_S shortens it, e.g. in tests.
            timeout = timedelta(seconds=float(os.environ.get("ZOO_DIST_TIMEOUT_S", 1800)))
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        return cls(rank=rank, world_size=world_size, device=device, strategy=strategy)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP returns a wrapper; FSDP2 shards `model` in place (its parameters become DTensors).

        FSDP2 shards each repeated block (every module in an nn.ModuleList: the decoder layers
        of any architecture) as its own unit, so only one block's full weights exist at a time,
        then the root for what is left (embedding, final norm, head)."""
        if not self.enabled:
            return model
        if self.strategy == "ddp":
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device is not None else None)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The mesh names the device type: left to itself, FSDP2 takes a GPU whenever one is visible,
        # and a gloo run on a one-GPU machine would send rank 1 to a GPU that does not exist.
        mesh = init_device_mesh(self.device.type if self.device is not None else "cpu", (self.world_size,))
        for module_list in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in module_list:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module):
        """Skip the gradient all-reduce / reduce-scatter: for all but the last accumulation micro-step."""
        if not self.enabled:
            yield
        elif self.strategy == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP2's gradient norm) is already global
            return t.full_tensor()
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

"""Data parallelism under `torchrun`, with PyTorch's own DistributedDataParallel.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; when they are absent everything here is a
no-op, so the same loop runs as one process. Gloo carries CPU runs (tested in CI with two
processes), NCCL carries GPU runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the GPU this process owns, or None (cpu / chosen by config)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and os.environ.get("ZOO_DDP_BACKEND", "") != "gloo"
        device = None
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank=rank, world_size=world_size, device=device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP all-reduces (averages) gradients during backward; `no_sync()` skips that for accumulation."""
        if not self.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device is not None else None)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        return t if dist.get_backend() == "nccl" else t / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

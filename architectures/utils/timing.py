"""Timing several candidates fairly on a shared machine: they take turns.

On a machine shared with other jobs, the speed of the same code drifts from minute to minute,
so two runs timed one after the other compare the machine's load as much as the code. Here the
candidates alternate within every round: a change of load hits them all alike, and a median over
the rounds discounts the few that a burst of load spoiled.

- `interleaved_step_times`: whole training steps (forward, backward, AdamW) of several models on
  one batch, the step time the experiments compare their runs at.
- `time_round_robin`: forward + backward of several implementations of one layer on one input,
  timed with CUDA events on a GPU and the host's clock on a CPU.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def interleaved_step_times(setups: dict[str, tuple[nn.Module, object]], batch, device: torch.device,
                           autocast: torch.dtype | None = None, rounds: int = 5) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) of each model on one batch, the
    models taking turns: a busy shared machine slows each of them alike, where the runs' own clocks,
    read minutes apart, would not be comparable. Round 0 warms up (allocator, kernels) and is not counted.
    setups: {name: (model, loss_fn(model, batch) -> (loss, metrics))}; the models train a few steps here,
    so pass copies of the ones to keep. autocast: the dtype of a bf16 run, None for full precision."""
    batch = [t.to(device) for t in batch]
    steps = {}
    for name, (model, loss_fn) in setups.items():
        model.to(device).train()
        steps[name] = (model, loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i in range(rounds + 1):
        for name, (model, loss_fn, opt) in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss, _ = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_round_robin(fns: dict, x, grad, params, warmup: int, iters: int, device) -> dict[str, list[float]]:
    """Seconds of one forward + backward per implementation, the implementations taking turns
    within each iteration, so a load change on a shared machine hits them all alike.
    fns: {name: fn(x) -> y}; grad: the gradient y's backward starts from; params: the parameters
    whose gradients are cleared before each step (x's too). Each fn runs `warmup` untimed steps first."""
    def step(fn):
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(grad)

    for fn in fns.values():
        for _ in range(warmup):
            step(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(fn)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                step(fn)
                times[name].append(time.perf_counter() - t)
    return times

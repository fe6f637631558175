"""What the training loop measures, and where it goes: metrics.jsonl, the `on_log` hook, the
terminal and loss.png.

- `Window`: what accumulates between two log lines, on the device so that no step waits for it
  (the losses, the loss's other metrics, the tokens that trained, the host's time on batches).
- `MetricsLog`: where an entry goes once the loop has made it. Every process keeps the history
  (a resumed run starts from the lines its checkpoint kept, see training/checkpointing.py); only
  the main process writes the JSONL file (each line flushed as it is written, so a run that dies
  keeps every line before it), the lines for the terminal, the progress bar and the loss curve.
- `memory_gb` and `peak_flops`: the GPU memory an entry reports, and the peak its MFU divides by.

Throughput (`tokens_per_s`) counts the tokens that train: the "num_tokens" a loss reports, else
the targets of the batch (y of an (x, y) batch).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from training.distributed import Distributed
from training.plots import Curve, plot_curves

# Dense bf16 peak of the GPUs we report MFU on (FLOP/s), from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of `device` when it is a GPU of PEAK_BF16_FLOPS (else None: no MFU)."""
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)


def memory_gb(device: torch.device) -> dict[str, float]:
    """The GPU memory of the process in GiB (2^30 bytes, despite the names): its peak so far, and
    what is allocated now. Between steps (activations and gradients freed) that is parameters +
    AdamW moments (+ DDP's gradient buckets), the memory FSDP2 divides across GPUs. Nothing on a CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "state_memory_gb": torch.cuda.memory_allocated(device) / 2**30}


@dataclass
class Window:
    """What accumulates between two log lines. The sums stay on the device, so that no step waits
    for the GPU; they are read once per log line. A checkpoint saves the sums, the step count and
    the NaN flag (`saved`) and a resume restores them (`restored`), so the first line after a
    resume averages the same steps as the uninterrupted run's, wherever the checkpoint fell."""
    loss_sum: torch.Tensor  # each step's mean loss (this process's share of it), summed over the steps
    bad_step: torch.Tensor  # first step (from 0) whose loss was not finite, -1 while none; never reset
    extra_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # the loss's other metrics, summed likewise
    steps: int = 0  # optimizer steps in the window
    tokens: int | torch.Tensor = 0  # tokens that trained (a device tensor once a loss has counted them)
    data_s: float = 0.0  # the host's own time spent on batches
    t_start: float = field(default_factory=time.perf_counter)  # the window's start, or the end of an evaluation

    @classmethod
    def restored(cls, saved: dict | None, device: torch.device) -> Window:
        """A resumed run's window as its checkpoint saved it, or an empty one."""
        if saved is None:
            return cls(torch.zeros((), device=device), torch.full((), -1, dtype=torch.long, device=device))
        return cls(saved["loss_sum"].to(device), saved["bad_step"].to(device),
                   {k: v.to(device) for k, v in saved["extra_sums"].items()}, saved["steps"])

    def saved(self, dd: Distributed) -> dict:
        """What a checkpoint keeps of the window: its sums, averaged over processes."""
        return {"loss_sum": dd.mean(self.loss_sum).cpu(), "steps": self.steps, "bad_step": self.bad_step.cpu(),
                "extra_sums": {k: dd.mean(v).cpu() for k, v in self.extra_sums.items()}}

    def next(self) -> Window:
        """The window after a log line: empty, but still holding the first non-finite step."""
        return Window(torch.zeros((), device=self.loss_sum.device), self.bad_step)


class MetricsLog:
    """The history of a run's metrics entries, and where each one is shown as it is logged.

    `history` holds the entries of the run so far (those of a resumed run's checkpoint);
    `out` is the run's directory (None: no metrics.jsonl); the progress bar counts steps from
    `initial` to `total` and is drawn only when stderr is a terminal, which also decides
    whether a line is written above the bar or printed."""

    def __init__(self, history: list[dict], out: Path | None, on_log: Callable[[dict], None] | None,
                 is_main: bool, total: int, initial: int, loss_label: str):
        self.history = history
        self.on_log = on_log if is_main else None
        self.is_main = is_main
        self.loss_label = loss_label  # how the terminal names the training loss
        # Appended to: a resumed run continues the file its checkpoint cut back to its step.
        self.file = open(out / "metrics.jsonl", "a") if (out is not None and is_main) else None
        self.interactive = sys.stderr.isatty() and is_main
        self.bar = tqdm(total=total, initial=initial, disable=not self.interactive, dynamic_ncols=True)

    def log(self, entry: dict) -> None:
        """One metrics entry: kept in the history, handed to `on_log`, appended to metrics.jsonl."""
        self.history.append(entry)
        if self.on_log is not None:
            self.on_log(entry)
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def say(self, line: str) -> None:
        """A line for the person at the terminal, written above the progress bar if there is one."""
        if self.is_main:
            (tqdm.write if self.interactive else print)(line)
            sys.stdout.flush()

    def advance(self) -> None:
        """One more step on the progress bar."""
        self.bar.update(1)

    def show_loss(self, loss: float) -> None:
        """The latest training loss, beside the progress bar."""
        self.bar.set_postfix({self.loss_label: f"{loss:.4f}"})

    def plot(self, path: Path) -> None:
        """The loss curve of the history so far (main process only)."""
        if self.is_main:
            plot_losses(self.history, path)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def plot_losses(history: list[dict], path: Path) -> None:
    """Training and validation loss against step (loss.png), written atomically."""
    train = [e for e in history if "loss" in e]
    val = [e for e in history if "val_loss" in e]
    curves = []
    if train:
        curves.append(Curve("train loss", [e["step"] for e in train], [e["loss"] for e in train]))
    if val:
        curves.append(Curve("validation loss", [e["step"] for e in val], [e["val_loss"] for e in val], marker="o"))
    plot_curves(curves, path, ylabel="loss (nats per token)")

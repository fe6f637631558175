"""The curves a distilled student and the same student trained from scratch are compared by.

The distilled run's own validation loss is its divergence to the teacher, which says nothing
about the data; so both runs measure the student's cross-entropy on the data at the loop's
evaluation steps, on the loop's validation batches (the same batches every time, for both runs),
into DIR/student_val.jsonl, and `plot_runs` draws them against the teacher's level in
distillation.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.utils.device import compute_dtype, resolve_device
from architectures.utils.files import atomic_write
from training.cli import RunData, is_main_process
from training.plots import Curve, plot_curves
from training.batches import batch_generator
from training.train_config import TrainConfig

VAL_CURVE = "student_val.jsonl"  # per run: validation cross-entropy at the loop's evaluation steps


class ValidationCurve:
    """The loop's `on_step` hook: at the loop's evaluation steps, the student's cross-entropy on the
    loop's validation batches, in nats per token and per character, appended to DIR/student_val.jsonl."""

    def __init__(self, out: Path, data: RunData, cfg: TrainConfig, resume: bool = False):
        self.path, self.cfg = out / VAL_CURVE, cfg
        self.chars_per_token = data.tokens.val_chars_per_token
        self.device = resolve_device(cfg.device)
        self.autocast = compute_dtype(cfg.dtype, self.device)
        micro = cfg.batch_size // cfg.grad_accum_steps  # the loop's validation batch on one process
        self.batches = [data.tokens.get_batch("val", micro, cfg.block_size, batch_generator(cfg.seed, "val", i))
                        for i in range(cfg.eval_batches)]
        self.points = read_curve(out) if resume else []
        self.first = True

    @torch.no_grad()
    def measure(self, model) -> float:
        was_training = model.training
        model.eval()
        total = 0.0
        for x, y in self.batches:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast != torch.float32):
                logits = model(x.to(self.device))
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten()))
        model.train(was_training)
        return total / len(self.batches)

    def record(self, step: int, model) -> None:
        loss = self.measure(model)
        self.points.append({"step": step, "val_loss": loss, "val_nats_per_char": loss / self.chars_per_token})
        if is_main_process():
            text = "".join(json.dumps(p) + "\n" for p in self.points)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def __call__(self, step: int, model) -> None:
        if self.first:  # on a resume, points after the checkpoint belong to the interrupted attempt
            self.points = [p for p in self.points if p["step"] < step]
            self.first = False
        if step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps:
            self.record(step, model)


def read_curve(out: Path) -> list[dict]:
    path = out / VAL_CURVE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_runs(runs: dict[str, list[dict]], teacher_nats: float, path: Path, title: str) -> None:
    """Validation nats/char against step for each run, and the teacher's as a line."""
    curves = [Curve(label, [p["step"] for p in points], [p["val_nats_per_char"] for p in points], marker="o")
              for label, points in runs.items() if points]
    plot_curves(curves, path, ylabel="validation nats per character", title=title,
                level=(f"teacher ({teacher_nats:.3f})", teacher_nats), size=(6.5, 4))

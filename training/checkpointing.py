"""Atomic, resumable checkpoints for the training loop.

A checkpoint directory holds the model's own files (config.json, model.safetensors,
tokenizer.json: whatever `save_model` writes, loadable by the architecture's
`from_pretrained`) and `trainer_state.pt` (optimizer, scheduler, RNG states, step, and
the configs the run was started with).

Atomicity is a two-phase commit: every file is first written into `OUT/.pending/`, then a
`COMMIT` marker is written there, then the files are moved into place. A crash before the
marker leaves the previous checkpoint untouched (the pending folder is discarded); a crash
after it is finished on the next load (roll forward). Either way all files agree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from architectures.common.checkpoint import (atomic_write, atomic_write_json, load_state_dict_strict,
                                             load_weights)

PENDING = ".pending"
STATE_FILE = "trainer_state.pt"


def _recover(out: Path) -> None:
    pending = out / PENDING
    if not pending.is_dir():
        return
    if (pending / "COMMIT").is_file():
        for f in pending.iterdir():
            if f.name != "COMMIT":
                os.replace(f, out / f.name)
    shutil.rmtree(pending)


def start_fresh(out: Path) -> None:
    """A new run in `out`: refuse to mix with an earlier run's checkpoint."""
    _recover(out)
    if (out / STATE_FILE).exists():
        raise FileExistsError(
            f"{out} already holds a training checkpoint; pass --resume to continue it, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def save(out: Path, model, optimizer, scheduler, step: int, record: dict, save_model) -> None:
    pending = out / PENDING
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    save_model(model, pending)
    state = {
        "step": step,
        "record": record,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_write(pending / STATE_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write_json(pending / "COMMIT", {"step": step})  # the commit point
    _recover(out)


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs now {b!r}")
    return out


def load(out: Path, model, optimizer, scheduler, record: dict, may_change: set[str]) -> tuple[int, list[dict]]:
    """Restore a run from `out`; returns (step reached, metrics logged up to that step)."""
    _recover(out)
    state_file = out / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"--resume: {out} has no {STATE_FILE}; start a new run without --resume")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    saved = {k: ({f: v for f, v in d.items() if f not in may_change} if k == "train" else d)
             for k, d in state["record"].items()}
    now = {k: ({f: v for f, v in d.items() if f not in may_change} if k == "train" else d) for k, d in record.items()}
    diffs = _differences(json.loads(json.dumps(saved)), json.loads(json.dumps(now)))
    if diffs:
        raise ValueError("--resume: the checkpoint was made with a different configuration: " + "; ".join(diffs)
                         + ". Resume with the same settings, or start a new run in another --out")
    load_state_dict_strict(model, load_weights(out), where=str(out))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    step = state["step"]
    # Metrics logged after the checkpoint belong to the interrupted attempt: drop them.
    history = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        history = [e for e in map(json.loads, metrics.read_text().splitlines()) if e["step"] <= step]
        atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(json.dumps(e) + "\n" for e in history)))
    return step, history


def plot_losses(history: list[dict], path: Path) -> None:
    """Training and validation loss against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in history if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

"""Curves against the optimizer step, drawn one way for every figure a training run writes.

The loop's loss.png (training and validation loss, `metrics.plot_losses`), distillation's
validation curves of the distilled and the from-scratch student beside the teacher's level
(distillation.png) and GRPO's reward curve (grpo.png) are the same kind of figure: a few series
of (step, value) and perhaps a horizontal line. `plot_curves` draws them and writes the PNG
atomically, so a run interrupted mid-write never leaves half a figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from architectures.utils.files import atomic_write


@dataclass
class Curve:
    label: str  # its name in the legend
    steps: list  # x: optimizer steps
    values: list  # y, one per step
    marker: str | None = None  # "o" marks each point (a curve measured every few hundred steps)


def plot_curves(curves: list[Curve], path: Path, *, ylabel: str | None = None, title: str | None = None,
                level: tuple[str, float] | None = None, size: tuple[float, float] = (6, 4), dpi: int = 100,
                grid: bool = True) -> None:
    """The curves against step, with `level` = (label, y) as a dashed gray line, to `path` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for curve in curves:
        ax.plot(curve.steps, curve.values, marker=curve.marker, label=curve.label)
    if level is not None:
        ax.axhline(level[1], color="gray", linestyle="--", label=level[0])
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if grid:
        ax.grid(alpha=0.3)
    if curves or level is not None:  # a checkpoint before the first log line has nothing to label yet
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)

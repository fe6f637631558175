"""The figures of notes/stable-diffusion.md, drawn from what the guidance experiment measured or sampled.
Each figure's footer names the command, the machine and the time that produced it."""

from __future__ import annotations

from pathlib import Path

import torch

from architectures.stable_diffusion.images import grid
from architectures.utils.files import atomic_write


def _save(fig, path: Path, footer: str) -> None:
    import matplotlib.pyplot as plt

    fig.text(0.01, -0.01, footer, fontsize=6.5, color="0.35", ha="left", va="top")  # below the axes' labels
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))
    plt.close(fig)


def _show(ax, images: torch.Tensor, rows: int, title: str) -> None:
    ax.imshow(grid(images, rows)[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def draw_guidance(results: list[dict], grids: dict[float, torch.Tensor], chance: float, judge: float, path: Path,
                  footer: str) -> None:
    """Accuracy against guidance scale (left), and one sample per class at each scale (right)."""
    import matplotlib.pyplot as plt

    fig, (ax, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.3]})
    g = [r["guidance"] for r in results]
    ax.plot(g, [100 * r["accuracy"] for r in results], "o-", label="samples (DDIM, 50 steps)")
    ax.axhline(100 * chance, ls=":", c="0.5", label=f"chance ({100 * chance:.0f}%)")
    ax.axhline(100 * judge, ls="--", c="tab:green", label=f"classifier on held-out real digits ({100 * judge:.1f}%)")
    ax.set(xlabel="guidance scale g (0: unconditional, 1: conditional, >1: guided)", ylabel="classified as prompted (%)",
           ylim=(0, 105))
    ax.legend(fontsize=7, loc="lower right")
    rows = torch.cat([grids[s] for s in sorted(grids)])  # one row per scale, one column per class
    _show(right, rows, len(grids), "rows: g = " + ", ".join(f"{s:g}" for s in sorted(grids)) + "; columns: prompts 0..9")
    _save(fig, path, footer)


def draw_samplers(results: list[dict], grids: dict[str, torch.Tensor], path: Path, footer: str) -> None:
    """Accuracy and time of each sampler (left), a sample per class from each (right)."""
    import matplotlib.pyplot as plt

    fig, (ax, right) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1, 1.3]})
    names = [f"{r['sampler'].upper()} {r['steps']}" for r in results]
    bars = ax.bar(names, [100 * r["accuracy"] for r in results], color=["tab:gray", "tab:blue", "tab:orange"])
    for bar, r in zip(bars, results):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, f"{100 * r['accuracy']:.1f}%\n"
                f"{r['seconds_per_image'] * 1000:.0f} ms/image", ha="center", fontsize=7)
    ax.set(ylabel="classified as prompted (%)", ylim=(0, 115), title=f"guidance {results[0]['guidance']:g}")
    _show(right, torch.cat(list(grids.values())), len(grids), "rows: " + ", ".join(names) + "; columns: prompts 0..9")
    _save(fig, path, footer)


def draw_noising(pixels: torch.Tensor, latents: torch.Tensor, steps: list[int], path: Path, footer: str) -> None:
    """A digit noised in closed form at several t: in pixel space (top) and in latent space, decoded (bottom)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(8, 2.5))
    _show(ax, torch.cat([pixels, latents]), 2, "x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at t = "
          + ", ".join(map(str, steps)) + "\ntop: the image itself; bottom: its 4x4x4 latent, noised, then decoded")
    _save(fig, path, footer)


def draw_trajectory(latents: torch.Tensor, guesses: torch.Tensor, steps: list[int], path: Path, footer: str) -> None:
    """A denoising run (DDIM): the latent z_t decoded (top) and the model's guess of x_0 decoded (bottom)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(8, 2.5))
    _show(ax, torch.cat([latents, guesses]), 2, "DDIM, 50 steps, 'the digit three', g = 3; shown at steps "
          + ", ".join(map(str, steps)) + "\ntop: z_t decoded; bottom: the predicted clean latent x_0 decoded")
    _save(fig, path, footer)

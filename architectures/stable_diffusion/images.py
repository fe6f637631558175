"""Image grids as PNG files, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from architectures.utils.files import atomic_write


def grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (rows*(H+1)-1, cols*(W+1)-1, C) image, a 1-pixel white gap between tiles."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    out = torch.ones(rows * (h + 1) - 1, cols * (w + 1) - 1, c)
    for i, img in enumerate(images.detach().float().cpu()):
        r, k = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = img.permute(1, 2, 0)
    return out


def save_grid(images: torch.Tensor, path: str | Path, rows: int, scale: int = 4) -> None:
    """Write the grid of `images` ((N, C, H, W) in [0, 1]) as a PNG, each pixel `scale` x `scale`."""
    import matplotlib.pyplot as plt

    g = grid(images, rows).repeat_interleave(scale, 0).repeat_interleave(scale, 1).clamp(0, 1).numpy()
    image = g[..., 0] if g.shape[-1] == 1 else g
    atomic_write(path, lambda tmp: plt.imsave(tmp, image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
                                              format="png"))

"""CIFAR-10 as torch tensors, through Hugging Face `datasets`.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009): 60,000 32x32 RGB
images in 10 classes. The hub copy `uoft-cs/cifar10` is parquet with an image column `img`
(PNG bytes) and a class-id column `label`; `load_cifar10` reads it, or any local parquet/JSON
file of the same columns, into (N, 3, 32, 32) floats in [0, 1] and (N,) class ids.
tests/fundamentals/test_cnn.py checks it on a parquet file of PNG images it writes itself; the
full data set (about 130 MB) is not downloaded by any test or train.py in this repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CIFAR10_HUB_NAME = "uoft-cs/cifar10"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_COLUMNS = ("img", "image")  # uoft-cs/cifar10 calls it img; other copies call it image


def load_cifar10(source: str = CIFAR10_HUB_NAME, split: str = "train", limit: int | None = None,
                 cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32) float32 in [0, 1], labels (N,) int64) from the hub or a local file.

    source: a hub dataset name, or a local .parquet / .json / .jsonl file (or a folder of
    .parquet files) whose rows hold PNG/JPEG bytes in `img` or `image` and a class id in `label`.
    """
    import datasets

    path = Path(source)
    if path.exists():
        files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [str(path)]
        if not files:
            raise FileNotFoundError(f"{path} is a folder without .parquet files; pass a .parquet/.json file instead")
        builder = "json" if files[0].endswith((".json", ".jsonl")) else "parquet"
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split, cache_dir=cache_dir)
    else:
        try:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
        except Exception as e:  # no internet, a typo in the name, a split that does not exist
            raise FileNotFoundError(f"could not load {source!r} (split {split!r}) from the Hugging Face hub: "
                                    f"{type(e).__name__}: {e}; pass a local .parquet file instead") from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    column = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if column is None or "label" not in ds.column_names:
        raise ValueError(f"{source} has columns {ds.column_names}; CIFAR-10 needs an image column "
                         f"({' or '.join(IMAGE_COLUMNS)}) and a 'label' column")
    if not isinstance(ds.features[column], datasets.Image):
        # A parquet file written without the hub's metadata stores the image as {bytes, path}:
        # telling datasets it is an image makes it decode the bytes.
        ds = ds.cast_column(column, datasets.Image())
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in ds[column]])  # (N, 32, 32, 3)
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{source}: images are {images.shape[1]}x{images.shape[2]}, CIFAR-10's are 32x32")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, 32, 32): channels first for conv
    y = torch.tensor(ds["label"], dtype=torch.long)
    if len(y) and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{source}: labels range from {y.min().item()} to {y.max().item()}, CIFAR-10's are 0..9")
    return x, y

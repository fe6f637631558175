"""What every fundamentals train.py shares: the digits split, the summary, the stopwatch.

Data: scikit-learn's 8x8 digits (1,797 images of 0-9, UCI's "Optical Recognition of
Handwritten Digits", bundled with scikit-learn, so nothing is downloaded). The split is fixed:
360 test images (20%), stratified by class, shuffled with seed 0, so every script's test
accuracy is on the same images.

The command line they share is fundamentals/cli.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from architectures.utils.files import atomic_write_json

DIGITS_TEST_SIZE = 360  # 20% of 1,797
DIGITS_SPLIT_SEED = 0


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): x of shape (N, 64) in [0, 1] (float32), y class ids (int64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x.numpy(), y.numpy(), test_size=DIGITS_TEST_SIZE,
                                              stratify=y.numpy(), random_state=DIGITS_SPLIT_SEED)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def report(out: str | Path, result: dict) -> None:
    """Write the run's summary.json to the output folder and print it as one parsable line."""
    atomic_write_json(Path(out) / "summary.json", result)  # written last: its presence marks a finished run
    print("result " + json.dumps(result), flush=True)


class Stopwatch:
    """Seconds since construction; the scripts report wall time of training and evaluation together."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def start(cfg) -> tuple[Stopwatch, torch.Generator]:
    """What every script does first: its thread count, the global seed (initialisation, dropout) and
    a generator of that seed for the batch order; returns the run's stopwatch and that generator."""
    torch.set_num_threads(cfg.threads)
    clock = Stopwatch()
    torch.manual_seed(cfg.seed)
    return clock, torch.Generator().manual_seed(cfg.seed)

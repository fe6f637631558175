"""The tiny preset's images and prompts: scikit-learn's handwritten digits, upsampled, with captions.

`sklearn.datasets.load_digits` ships 1,797 grey 8x8 digits (values 0..16) inside the package, so
the train script runs offline. They are upsampled bilinearly (to 16x16 by default) and mapped to [-1, 1];
the last 10% (by a fixed shuffle) are held out, for validation and for the classifier's test.
Each image is captioned by its class in one of a few phrasings ("seven", "the digit seven",
"a handwritten seven", "a 7", ...), so the conditioning goes through the tokenizer, the text encoder and
cross-attention exactly as a text prompt does in SD; an empty caption is the unconditional prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("{name}", "the digit {name}", "a handwritten {name}", "a {digit}", "digit {digit}")
VAL_FRACTION = 0.1


def caption(label: int, template: int = 1) -> str:
    """The caption of class `label` in phrasing `template` (1: "the digit seven", what sampling uses)."""
    return TEMPLATES[template].format(name=NAMES[label], digit=label)


def all_captions() -> list[str]:
    return [caption(c, k) for c in range(len(NAMES)) for k in range(len(TEMPLATES))]


@dataclass
class Digits:
    train_images: torch.Tensor  # (N_train, 1, S, S) in [-1, 1]
    train_labels: torch.Tensor  # (N_train,)
    val_images: torch.Tensor
    val_labels: torch.Tensor


def load_digits(size: int = 16) -> Digits:
    """The digits at `size` x `size`, split 90/10 by a fixed permutation."""
    from sklearn.datasets import load_digits as sklearn_digits

    if size < 8:
        raise ValueError(f"--image-size {size} is smaller than the digits' 8x8; use 8 or more")
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1  # (1797, 1, S, S)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = int(len(labels) * VAL_FRACTION)
    val, train = order[:n_val], order[n_val:]
    return Digits(images[train], labels[train], images[val], labels[val])

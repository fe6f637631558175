"""A small CNN that recognises the digits, trained on the real images with the zoo's one loop: the judge
of whether a sample drawn for "the digit seven" shows a seven.

    (B, 1, 16, 16) -> conv 3x3 (32) -> pool -> (B, 32, 8, 8) -> conv 3x3 (64) -> pool -> (B, 64, 4, 4) -> linear -> (B, 10)

It trains on the training split (each batch shifted by up to a pixel, so that it judges shapes, not
exact positions) and reports its accuracy on the held-out split, which the experiment prints beside
the samples' accuracy: a sample cannot be judged better than the judge.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from architectures.stable_diffusion.digits import Digits
from architectures.utils.files import atomic_write
from training.train_config import TrainConfig
from training.trainer import train


class DigitClassifier(nn.Module):
    def __init__(self, size: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64 * (size // 4) ** 2, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 1, S, S) -> class logits (B, 10)."""
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)  # (B, 32, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, S/4, S/4)
        return self.head(x.flatten(1))


def classifier_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = model(batch["images"])
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits, batch["labels"]), {"accuracy": accuracy.detach()}


def shifted_batches(digits: Digits):
    def sample(split: str, n: int, g: torch.Generator) -> dict:
        images, labels = (digits.train_images, digits.train_labels) if split == "train" else \
            (digits.val_images, digits.val_labels)
        idx = torch.randint(0, len(labels), (n,), generator=g)
        x = images[idx]
        if split == "train":  # one shift of the batch, up to a pixel each way (the border is background)
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        return {"labels": labels[idx], "images": x}
    return sample


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` ((N, 1, S, S) in [-1, 1]) the classifier labels as `labels`."""
    model.eval()
    predicted = torch.cat([model(chunk).argmax(-1) for chunk in images.split(512)])
    return float((predicted == labels.to(predicted.device)).float().mean())


def trained_classifier(digits: Digits, path: Path, steps: int = 600, device: str = "cpu") -> DigitClassifier:
    """The classifier saved at `path`, or one trained now (a few seconds) and saved there."""
    size = digits.train_images.shape[-1]
    model = DigitClassifier(size)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()
    cfg = TrainConfig(max_steps=steps, batch_size=64, lr=3e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0,
                      eval_interval=steps, eval_batches=2, log_interval=100, device=device, dtype="fp32")
    train(model, classifier_loss, shifted_batches(digits), cfg, None)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return model.eval()

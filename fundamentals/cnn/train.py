"""Train the small im2col CNN or the ResNet on scikit-learn's 8x8 digits.

    python -m fundamentals.cnn.train --preset resnet      # 2-core CPU, about a minute
    python -m fundamentals.cnn.train --preset small       # the im2col convolutions of conv.py

AdamW with warm-up + cosine (fundamentals.optim's `warmup_cosine`), cross-entropy, and random
shifts of up to one pixel as augmentation (1,437 training images are few for a ResNet).
Prints the test accuracy on the fixed 360-image split and the wall time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from architectures.utils.command_line import command_line
from fundamentals.cnn.models import ResNet, SmallCNN
from fundamentals.cli import AT_LEAST_1, Range, parse_config
from fundamentals.common import load_digits_split, report, start
from fundamentals.optim import warmup_cosine


@dataclass
class CNNConfig:
    # a shift of 8 pixels would move a digit off its 8x8 image
    RANGES: ClassVar = {"width": AT_LEAST_1, "blocks": AT_LEAST_1, "shift": Range(0, 7)}
    CHOICES: ClassVar = {"model": ("resnet", "small")}

    model: str = "resnet"  # "resnet" (torch layers, batch norm, skips) or "small" (conv.py's im2col convolutions)
    width: int = 16  # channels of the first stage; ResNet stages use width, 2*width, 4*width
    blocks: int = 2  # basic blocks per ResNet stage
    epochs: int = 20  # passes over the training images
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 5e-4  # AdamW's decoupled weight decay
    warmup_steps: int = 50  # linear warm-up, then cosine to lr/100
    shift: int = 1  # augmentation: random translation of up to this many pixels (0: none)
    seed: int = 0  # initial weights, the batch order and the shifts
    threads: int = 2  # torch's CPU threads: conv layers are large enough to use both cores


PRESETS = {
    "resnet": CNNConfig(),
    "small": CNNConfig(model="small", width=16, epochs=30, lr=5e-3, weight_decay=1e-4),
    "tiny": CNNConfig(width=8, blocks=1, epochs=1),  # for tests: a second or two, accuracy not meaningful
}


def random_shift(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to k pixels in each direction (zero fill): pad by k, crop at random."""
    if k == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (k, k, k, k))
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def build(cfg: CNNConfig) -> torch.nn.Module:
    if cfg.model == "resnet":
        return ResNet(widths=(cfg.width, 2 * cfg.width, 4 * cfg.width), blocks=cfg.blocks)
    if cfg.model == "small":
        return SmallCNN(channels=(cfg.width, 2 * cfg.width))
    raise ValueError(f"--model {cfg.model!r} is not one of 'resnet', 'small'")


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # batch norm uses its running statistics, not the test batch's
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


@command_line
def main(argv=None) -> dict:
    cfg, out = parse_config(argv, PRESETS, "python -m fundamentals.cnn.train", __doc__)
    clock, g = start(cfg)
    x_train, y_train, x_test, y_test = load_digits_split()
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)  # (N, 64) -> (N, C=1, 8, 8)
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total, step = cfg.epochs * -(-len(x_train) // cfg.batch_size), 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[idx], cfg.shift, g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, cfg.lr, cfg.lr / 100, cfg.warmup_steps, total)
            opt.step()
            step += 1
        if epoch % 10 == 9 or epoch == cfg.epochs - 1:
            print(f"epoch {epoch + 1}: train loss {loss.item():.4f}, test accuracy {accuracy(model, x_test, y_test):.4f}",
                  flush=True)
    result = {"task": f"digits {cfg.model}", "test_accuracy": round(accuracy(model, x_test, y_test), 4),
              "test_images": len(x_test), "parameters": sum(p.numel() for p in model.parameters()), "steps": step,
              "seconds": clock(), "threads": cfg.threads, "config": asdict(cfg)}
    report(out, result)
    return result


if __name__ == "__main__":
    main()

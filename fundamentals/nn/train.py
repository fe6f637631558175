"""Train an MLP built on the from-scratch autograd on scikit-learn's 8x8 digits.

    python -m fundamentals.nn.train                     # 2-core CPU, a few seconds
    python -m fundamentals.nn.train --optimizer sgd --lr 0.1 --epochs 40

Everything below the data loading is this repository's own: `Tensor` records the graph,
`cross_entropy` is made of its ops, `Linear`/`LayerNorm`/`Dropout` are `fundamentals.nn`
modules, the update is `fundamentals.optim`'s AdamW or SGD under `warmup_cosine`. torch only
stores the arrays. Prints the test accuracy on the fixed 360-image split and the wall time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from architectures.utils.command_line import command_line
from fundamentals.autograd import Tensor, cross_entropy, no_grad
from fundamentals.cli import Range, parse_config
from fundamentals.common import Stopwatch, load_digits_split, report
from fundamentals.nn import Dropout, LayerNorm, Linear, ReLU, Sequential
from fundamentals.optim import SGD, AdamW, warmup_cosine


@dataclass
class MLPConfig:
    RANGES: ClassVar = {"dropout": Range(0, 1, high_open=True)}
    CHOICES: ClassVar = {"optimizer": ("adamw", "sgd")}

    hidden: int = 128  # width of the two hidden layers
    dropout: float = 0.1  # after each hidden layer: 1,437 training images overfit quickly
    epochs: int = 30  # passes over the training images
    batch_size: int = 64  # images per step
    optimizer: str = "adamw"  # "adamw" or "sgd" (Nesterov momentum 0.9)
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 1e-4  # AdamW: weights shrink by lr*wd a step; SGD: wd*p added to the gradient (L2)
    warmup_steps: int = 50  # linear warm-up, then cosine to lr/10
    seed: int = 0  # initial weights, dropout and the batch order
    # 1: these matrices are tiny (64 x 128), and on a busy 2-core machine a second thread made a
    # transposed float64 matmul ~50x slower (3.5 ms instead of 40-65 us) while the threads waited for each other
    threads: int = 1  # torch's CPU threads (1: tiny matrices, a second thread only waited)


PRESETS = {
    "default": MLPConfig(),
    "tiny": MLPConfig(hidden=32, epochs=2),  # for tests: runs in about a second, accuracy not meaningful
}


def build_mlp(cfg: MLPConfig) -> Sequential:
    return Sequential(
        Linear(64, cfg.hidden), LayerNorm(cfg.hidden), ReLU(), Dropout(cfg.dropout),
        Linear(cfg.hidden, cfg.hidden), ReLU(), Dropout(cfg.dropout),
        Linear(cfg.hidden, 10),
    )


def accuracy(model: Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with no_grad():
        pred = model(Tensor(x)).data.argmax(-1)
    model.train()
    return (pred == y).double().mean().item()


@command_line
def main(argv=None) -> dict:
    cfg, out = parse_config(argv, PRESETS, "python -m fundamentals.nn.train", __doc__)
    torch.set_num_threads(cfg.threads)
    clock = Stopwatch()
    torch.manual_seed(cfg.seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    x_train, x_test = x_train.double(), x_test.double()
    model = build_mlp(cfg)
    if cfg.optimizer == "adamw":
        opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    total, step = cfg.epochs * steps_per_epoch, 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = cross_entropy(model(Tensor(x_train[idx])), y_train[idx])  # (B, 10) logits -> mean nats
            opt.zero_grad()
            loss.backward()
            opt.lr = warmup_cosine(step, cfg.lr, cfg.lr / 10, cfg.warmup_steps, total)
            opt.step()
            step += 1
        if epoch % 10 == 9 or epoch == cfg.epochs - 1:
            print(f"epoch {epoch + 1}: train loss {loss.item():.4f}, test accuracy {accuracy(model, x_test, y_test):.4f}",
                  flush=True)
    result = {"task": "digits MLP (fundamentals autograd)", "test_accuracy": round(accuracy(model, x_test, y_test), 4),
              "test_images": len(x_test), "parameters": model.num_parameters(), "steps": step,
              "seconds": clock(), "threads": torch.get_num_threads(), "config": asdict(cfg)}
    report(out, result)
    return result


if __name__ == "__main__":
    main()

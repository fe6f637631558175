"""Softmax regression on scikit-learn's 8x8 digits with nothing but `Tensor` and a hand-written update.

    python -m fundamentals.autograd.train               # 2-core CPU, about a second

The smallest complete use of the autograd: logits = x W + b, loss = cross_entropy, backward,
then p <- p - lr * grad by hand (no module, no optimizer: those are fundamentals.nn and
fundamentals.optim). A linear model cannot reach the MLP's accuracy (fundamentals/nn/train.py);
it shows the loop works. Prints the test accuracy on the fixed 360-image split and the time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from architectures.utils.command_line import command_line
from fundamentals.autograd import Tensor, cross_entropy, no_grad
from fundamentals.cli import parse_config
from fundamentals.common import Stopwatch, load_digits_split, report


@dataclass
class SoftmaxRegressionConfig:
    steps: int = 300  # full-batch gradient steps over the 1,437 training images
    lr: float = 0.5  # plain gradient descent: the loss is convex, a large constant step is fine


PRESETS = {"default": SoftmaxRegressionConfig(), "tiny": SoftmaxRegressionConfig(steps=5)}


@command_line
def main(argv=None) -> dict:
    cfg, out = parse_config(argv, PRESETS, "python -m fundamentals.autograd.train", __doc__)
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting (see fundamentals/nn/train.py)
    clock = Stopwatch()
    x_train, y_train, x_test, y_test = load_digits_split()
    w = Tensor(torch.zeros(64, 10), requires_grad=True)  # zeros are fine: the loss is convex
    b = Tensor(torch.zeros(10), requires_grad=True)
    x = Tensor(x_train)
    for step in range(cfg.steps):
        loss = cross_entropy(x @ w + b, y_train)  # (N, 10) logits
        w.zero_grad(), b.zero_grad()
        loss.backward()
        w.data -= cfg.lr * w.grad  # gradient descent by hand on the storage, outside the graph
        b.data -= cfg.lr * b.grad
        if step % 100 == 0 or step == cfg.steps - 1:
            print(f"step {step}: train loss {loss.item():.4f}", flush=True)
    with no_grad():
        acc = ((Tensor(x_test) @ w + b).data.argmax(-1) == y_test).double().mean().item()
    result = {"task": "digits softmax regression (fundamentals autograd)", "test_accuracy": round(acc, 4),
              "test_images": len(x_test), "steps": cfg.steps, "seconds": clock(), "config": asdict(cfg)}
    report(out, result)
    return result


if __name__ == "__main__":
    main()

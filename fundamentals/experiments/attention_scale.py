"""Experiment: why attention divides its scores by sqrt(d), measured on random queries and keys.

    python -m fundamentals.experiments.attention_scale --figure notes/figures/attention-scale.png

Queries and keys with independent N(0, 1) entries, as a freshly initialised model's are after
normalisation, for head widths d = 16, 64 and 256: q . k is a sum of d products of unit
variance, so its standard deviation is sqrt(d); divided by sqrt(d) it is 1 whatever d is.
For each d, prints the spread of the scores, the largest softmax weight of each query over
`--keys` keys (near 1 means the softmax is nearly one-hot), and the fraction of queries whose
softmax is saturated (largest weight over 0.99: the softmax's Jacobian diag(p) - p p^T is then
nearly zero, and so is the gradient to every score). Draws the
histogram of the scores with and without the scale, and of the largest weights. Seeded: the
same numbers every run. Read in notes/attention.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from architectures.utils.command_line import ArgumentParser, command_line

WIDTHS = (16, 64, 256)


def scores(d: int, queries: int, keys: int, seed: int = 0) -> torch.Tensor:
    """(queries, keys) dot products q . k of N(0, 1) vectors of width d, unscaled."""
    g = torch.Generator().manual_seed(seed + d)
    q = torch.randn(queries, d, generator=g, dtype=torch.float64)
    k = torch.randn(keys, d, generator=g, dtype=torch.float64)
    return q @ k.T


def measure(d: int, queries: int, keys: int) -> dict:
    raw = scores(d, queries, keys)
    row = {"d": d}
    for name, s in (("unscaled", raw), ("scaled", raw / math.sqrt(d))):
        largest = s.softmax(-1).max(-1).values  # (queries,)
        row[f"{name}_std"] = s.std().item()
        row[f"{name}_max_weight"] = largest.mean().item()
        row[f"{name}_saturated"] = (largest > 0.99).double().mean().item()
    return row


def draw(path: Path, queries: int, keys: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    d = 64
    raw = scores(d, queries, keys)
    bins = torch.linspace(-40, 40, 161)
    left.hist(raw.flatten().numpy(), bins=bins.numpy(), alpha=0.6, label=f"q . k (std {raw.std():.1f})")
    left.hist((raw / math.sqrt(d)).flatten().numpy(), bins=bins.numpy(), alpha=0.6,
              label=f"q . k / sqrt({d}) (std {(raw / math.sqrt(d)).std():.2f})")
    left.set(title=f"attention scores, d = {d}, N(0, 1) queries and keys", xlabel="score", ylabel="count")
    left.legend()
    for name, s in (("unscaled", raw), ("scaled", raw / math.sqrt(d))):
        right.hist(s.softmax(-1).max(-1).values.numpy(), bins=50, range=(0, 1), alpha=0.6, label=name)
    right.set(title=f"largest softmax weight of each query over {keys} keys", xlabel="largest weight", ylabel="queries")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m fundamentals.experiments.attention_scale", description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=2000, help="random queries per head width")
    p.add_argument("--keys", type=int, default=128, help="keys each query attends over")
    p.add_argument("--figure", default=None, help="write the histograms to this .png (default: print only)")
    args = p.parse_args(argv)
    if args.queries < 2 or args.keys < 2:
        p.error("--queries and --keys must be at least 2")
    rows = [measure(d, args.queries, args.keys) for d in WIDTHS]
    for row in rows:
        print("attention_scale " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in row.items()))
    if args.figure:
        draw(Path(args.figure), args.queries, args.keys)
        print(f"figure: {args.figure}")
    return rows


if __name__ == "__main__":
    main()

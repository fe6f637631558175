"""Evaluating a language model the way every figure in the zoo reports it: over a whole split.

The loop's periodic validation is an estimate over random windows; `evaluate_split` reads every
token of the split once, in non-overlapping windows, and is the figure README and notes report
(divided by characters per token: nats per character).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_split(model, tokens: torch.Tensor, block_size: int, batch_size: int = 32, device="cpu") -> float:
    """Mean next-token loss (nats/token) over a whole split, in non-overlapping windows.

    Unlike the loop's periodic estimate over random windows, this reads every token once,
    so it is the figure we report. tokens: 1-D; each window of block_size+1 tokens predicts
    its last block_size tokens.
    """
    was_training = model.training
    model.eval()
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"split of {len(tokens)} tokens is too short for one window of {block_size + 1}")
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_windows)) * block_size
        rows = torch.stack([tokens[i: i + block_size + 1] for i in idx.tolist()]).long().to(device)
        logits = model(rows[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    model.train(was_training)
    return total / count

"""Language-model pretraining as a "method" of the shared loop: its batch and its loss.

A batch is (x, y), token ids of shape (B, T) with y = x shifted left by one; the loss is
the mean next-token cross-entropy in nats per token. Other methods (SFT, DPO, distillation)
bring their own batch and loss in the same shape: `loss_fn(model, batch) -> (loss, metrics)`.
Every row here has block_size targets, so a mean per micro-batch is already a mean per token; a
loss whose rows hold different numbers of targets returns their sum with metrics["num_tokens"]
instead (training/trainer.py explains why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch  # (B, T), (B, T)
    logits = model(x)  # (B, T, V)
    # Cross-entropy in fp32: under bf16 autocast the logits are bf16, whose 8-bit mantissa
    # would round the log-sum-exp.
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss, {}


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

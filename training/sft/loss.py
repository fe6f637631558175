"""SFT's loss: cross-entropy on the assistant's tokens, summed, with their count for the loop.

Rows hold different numbers of trained tokens (a long answer, a short one, padding), so the
loss is returned as a SUM with metrics["num_tokens"]: the loop divides the step's gradient by
the trained tokens of the whole step, and every assistant token weighs the same wherever it
falls (training/trainer.py). With `chunk_size`, the output head and the cross-entropy run over
that many tokens at a time (`linear_cross_entropy`), which is what lets a 128k-vocabulary model
fine-tune on one GPU without holding (tokens x vocabulary) fp32 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.common.loss import IGNORE_INDEX, linear_cross_entropy, output_head, output_softcap
from training.sft.batch import PackedRows
from training.loss_protocol import NUM_TOKENS


def forward_packed(model, batch: dict, hidden_only: bool = False) -> torch.Tensor:
    """The model on a batch, packed rows through `PackedRows`: logits (n, T, V), or hidden states."""
    cache = PackedRows(batch["doc_ids"], batch["positions"]) if "doc_ids" in batch else None
    return model(batch["input_ids"], cache, hidden_only=hidden_only)


def sft_loss(model, batch: dict, chunk_size: int = 0) -> tuple[torch.Tensor, dict]:
    labels = batch["labels"]  # (n, T), -100 where nothing is trained
    if chunk_size:
        hidden = forward_packed(model, batch, hidden_only=True)  # (n, T, D)
        loss = linear_cross_entropy(hidden, output_head(model).weight, labels, chunk_size, reduction="sum",
                                    softcap=output_softcap(model))
    else:
        logits = forward_packed(model, batch)  # (n, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
    return loss, {NUM_TOKENS: (labels != IGNORE_INDEX).sum()}

"""The reward model's loss: Bradley-Terry on preference pairs.

Bradley and Terry (1952) model a comparison as P(y_w preferred to y_l) = sigmoid(r(y_w) - r(y_l));
fitting r by maximum likelihood on labelled pairs is the reward model of "Learning to summarize
from human feedback" (Stiennon et al., 2020, arXiv:2009.01325) and InstructGPT (Ouyang et al.,
2022, arXiv:2203.02155):

    loss = -mean_pairs log sigmoid(r_chosen - r_rejected)

Only differences of rewards enter, so a constant added to every score changes nothing: the scale
is fixed afterwards (`ScalarModel.normalise`). TRL's RewardTrainer computes the same loss
(`compute_loss`, optionally with a margin and a centring term, which this zoo does not use);
tests/training/reward/test_reward.py checks it against the formula written out pair by pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) from the scores (B,) of the chosen and the rejected replies. metrics:
    "accuracy" (pairs ranked right), "margin" (mean r_chosen - r_rejected), both detached."""
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected scores must both be (B,), one per pair; got {tuple(chosen.shape)} "
                         f"and {tuple(rejected.shape)}")
    diff = chosen.float() - rejected.float()
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, metrics

"""Distillation's loss: a divergence between the teacher's and the student's next-token distributions.

Papers:
- soft targets and temperature: "Distilling the Knowledge in a Neural Network" (Hinton, Vinyals
  and Dean, 2015, arXiv:1503.02531);
- forward vs reverse KL for language models, and the generalized Jensen-Shannon divergence:
  GKD, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
  (Agarwal et al., 2023, arXiv:2306.13649), eq. 1.

Symbols: p the teacher's distribution over the vocabulary at a position, q_theta the student's,
both softmax(logits / tau) at temperature tau.

    forward_kl   KL(p || q) = sum_v p_v (log p_v - log q_v)   mean-seeking: q must cover all of p
    reverse_kl   KL(q || p) = sum_v q_v (log q_v - log p_v)   mode-seeking: q may drop modes of p
    jsd          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q

As in TRL's `GKDTrainer.generalized_jsd_loss`, which this is tested against
(tests/training/distillation/test_distillation_loss.py), the jsd's two end points are defined
as the two KLs: beta = 0 is forward KL and beta = 1 reverse KL (the formula itself tends to 0 at
both ends, since m becomes one of the two distributions; divided by beta, resp. 1 - beta, it
tends to those KLs). Neither TRL nor this multiplies by tau^2, the factor Hinton et al. use
to keep the soft targets' gradients on the scale of a hard-label loss's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from architectures.common.loss import IGNORE_INDEX

KINDS = ("forward_kl", "reverse_kl", "jsd")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The divergence of `kind` per position, summed over the vocabulary, averaged over the positions
    whose label is not -100 (all positions without labels).

    student_logits, teacher_logits (..., V), typically (B, T, V); labels (...) with -100 where no
    distillation happens (a prompt, padding). Only the mask of labels is read: the loss needs the
    teacher's distribution, not the data's token. `beta` is the jsd's interpolation weight (ignored
    by the two KLs), `temperature` softens both distributions. The sums run in fp32 at least."""
    if kind not in KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (1: the models' own distributions, > 1: softer), "
                         f"got {temperature}")
    if not 0.0 <= beta <= 1.0:  # also refuses NaN
        raise ValueError(f"beta is the jsd's mixture weight and must be in [0, 1] (0: forward KL, 1: reverse KL), "
                         f"got {beta}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"the student's vocabulary has {student_logits.shape[-1]} tokens and the teacher's "
                         f"{teacher_logits.shape[-1]}; distillation compares the two distributions token by token, "
                         f"so both models need the same tokenizer")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must cover the same positions")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' positions, "
                         f"{tuple(student_logits.shape[:-1])}")

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # student, (..., V)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # teacher, (..., V)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        per_position = kl(log_p, log_q)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        per_position = kl(log_q, log_p)
    else:
        # log m = log(beta p + (1 - beta) q), as a log-sum-exp so that tiny probabilities keep their digits.
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        per_position = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)  # (...)
    if labels is None:
        return per_position.mean()
    mask = labels != IGNORE_INDEX
    # A batch with nothing to distil (every row a prompt) gives 0, with a gradient path, not 0/0.
    return per_position[mask].sum() / mask.sum().clamp_min(1)


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per position, from log-probabilities (..., V) -> (...).
    The log-softmax of finite logits is finite, so every term is (no 0 x inf to guard against)."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)

"""Distillation's loss (training/distillation/loss.py) against TRL 1.16's
`GKDTrainer.generalized_jsd_loss`, the reference implementation, and the divergences' properties.

TRL's function is a staticmethod (trl.experimental.gkd in 1.16), called directly. Its reduction
"batchmean" with labels is what `distillation_loss` returns, the sum over unmasked positions of
the per-position divergence divided by their count; without labels "batchmean" divides by the
batch size B instead of B x T, so the comparison without labels takes TRL's "sum" over all
positions, divided by B x T here. Tolerance 1e-10 in float64: the same sums, in another order.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from training.distillation import KINDS, distillation_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

B, T, V = 3, 7, 13


def logits_pair(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale,
            torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale)


def masked_labels(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("masked", [True, False])
def test_jsd_equals_trls_generalized_jsd_loss(beta, temperature, masked):
    student, teacher = logits_pair(seed=int(beta * 10 + temperature * 100))
    if masked:
        labels = masked_labels()
        expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    else:
        labels = None
        expected = GKDTrainer.generalized_jsd_loss(student, teacher, None, beta=beta, temperature=temperature,
                                                   reduction="sum") / (B * T)
    ours = distillation_loss(student, teacher, labels, kind="jsd", beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_forward_and_reverse_kl_are_trls_end_points(temperature):
    """TRL's beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher)."""
    student, teacher = logits_pair(seed=7)
    labels = masked_labels()
    for kind, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0)):
        expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
        ours = distillation_loss(student, teacher, labels, kind=kind, temperature=temperature)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_forward_kl_is_the_cross_entropy_to_the_teacher_minus_its_entropy():
    """KL(p || q) = H(p, q) - H(p): its gradient in the student is the soft-target cross-entropy's."""
    student, teacher = logits_pair(seed=1)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    expected = (-(p * log_q).sum(-1) + (p * p.log()).sum(-1)).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), expected)


def test_every_kind_is_zero_for_equal_distributions_and_positive_otherwise():
    student, teacher = logits_pair(seed=2)
    for kind in KINDS:
        assert distillation_loss(teacher, teacher + 5.0, kind=kind).abs() < 1e-12  # a shift changes no softmax
        assert distillation_loss(student, teacher, kind=kind) > 0


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_bounded_by_the_binary_entropy_of_beta_and_tends_to_the_kls(beta):
    """notes/distillation.md: m >= beta p and m >= (1 - beta) q, so KL(p || m) <= log(1 / beta) and
    KL(q || m) <= log(1 / (1 - beta)): the jsd is at most -beta log beta - (1 - beta) log(1 - beta)
    <= log 2 whatever the logits, where either KL is unbounded. Near the ends, jsd / beta tends to
    forward KL and jsd / (1 - beta) to reverse KL."""
    student, teacher = logits_pair(seed=5, scale=30.0)  # nearly one-hot, disagreeing distributions
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert float(distillation_loss(student, teacher, kind="jsd", beta=beta)) <= bound
    assert float(distillation_loss(student, teacher, kind="forward_kl")) > 10 * bound
    student, teacher = logits_pair(seed=6, scale=1.0)
    small = 1e-5
    torch.testing.assert_close(distillation_loss(student, teacher, kind="jsd", beta=small) / small,
                               distillation_loss(student, teacher, kind="forward_kl"), rtol=1e-3, atol=0)
    torch.testing.assert_close(distillation_loss(student, teacher, kind="jsd", beta=1 - small) / small,
                               distillation_loss(student, teacher, kind="reverse_kl"), rtol=1e-3, atol=0)


def test_masked_positions_contribute_nothing():
    student, teacher = logits_pair(seed=3)
    labels = masked_labels()
    changed = student.clone()
    changed[labels == -100] = 100.0  # anything, where nothing is distilled
    for kind in KINDS:
        torch.testing.assert_close(distillation_loss(changed, teacher, labels, kind),
                                   distillation_loss(student, teacher, labels, kind))
    nothing = torch.full((B, T), -100)
    assert distillation_loss(student, teacher, nothing) == 0


def test_reverse_kl_seeks_a_mode_and_forward_kl_covers_both():
    """A teacher with two modes and a gap between them, and the two choices of a student too weak
    to fit both (a unimodal family fitting a bimodal target): one mode exactly, or a broad bump
    over the span, gap included. Forward KL punishes the missed mode more (it must cover p);
    reverse KL punishes the mass in the gap more (it must not put mass where p has little)."""
    teacher = torch.log(torch.tensor([0.49, 0.02, 0.49]))
    one_mode = torch.log(torch.tensor([0.96, 0.02, 0.02]))
    spread = torch.log(torch.tensor([0.3, 0.4, 0.3]))
    fwd = {name: float(distillation_loss(s, teacher, kind="forward_kl")) for name, s in
           (("one_mode", one_mode), ("spread", spread))}
    rev = {name: float(distillation_loss(s, teacher, kind="reverse_kl")) for name, s in
           (("one_mode", one_mode), ("spread", spread))}
    assert fwd["spread"] < fwd["one_mode"] and rev["one_mode"] < rev["spread"]


def test_bf16_logits_are_compared_in_fp32():
    student, teacher = logits_pair(seed=4)
    loss = distillation_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="kl"), "unknown distillation kind 'kl'; choose one of forward_kl, reverse_kl, jsd"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(beta=1.5), "beta is the jsd's mixture weight and must be in [0, 1]"),
    (dict(beta=-0.1), "must be in [0, 1]"),
    (dict(beta=float("nan")), "must be in [0, 1]"),
])
def test_bad_arguments_are_refused(kwargs, message):
    student, teacher = logits_pair()
    with pytest.raises(ValueError) as e:
        distillation_loss(student, teacher, **kwargs)
    assert message in str(e.value)


def test_vocabularies_that_differ_are_refused_naming_both_sizes():
    student, teacher = torch.zeros(2, 3, 11), torch.zeros(2, 3, 13)
    with pytest.raises(ValueError) as e:
        distillation_loss(student, teacher)
    assert "student's vocabulary has 11 tokens and the teacher's 13" in str(e.value)
    with pytest.raises(ValueError, match="must cover the same positions"):
        distillation_loss(torch.zeros(2, 3, 11), torch.zeros(2, 4, 11))
    with pytest.raises(ValueError, match="must have the logits' positions"):
        distillation_loss(torch.zeros(2, 3, 11), torch.zeros(2, 3, 11), torch.zeros(2, 4, dtype=torch.long))

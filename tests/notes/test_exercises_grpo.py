"""The answers to the exercises of notes/grpo.md, computed from the code and compared with the hints the note
gives."""

import math

import torch

from training.grpo.loss import group_advantages, grpo_loss, k3


def test_the_advantages_of_two_groups(hints):
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    # first group: mean 0.5, unbiased std sqrt(1/3); second group: every reward 1, std 0
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(a[:4], torch.tensor([expected, -expected, -expected, expected]))
    assert torch.equal(a[4:], torch.zeros(4))
    assert f"{expected:.3f}" == "0.866"
    assert "+0.866 for the right answers and -0.866 for the wrong ones; the second group's are all 0" in hints("grpo")


def test_k3_and_k1_of_one_token(hints):
    logps, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-0.5, -1.0])  # d = ref - logps = +0.5, -0.5
    got = [round(v, 4) for v in k3(logps, ref).tolist()]
    assert got == [round(math.exp(0.5) - 1.5, 4), round(math.exp(-0.5) - 0.5, 4)] == [0.1487, 0.1065]
    k1 = (logps - ref).tolist()  # the plain estimate -d
    assert k1 == [-0.5, 0.5]
    assert "k3 = e^0.5 - 1.5 = 0.1487 and e^-0.5 - 0.5 = 0.1065; -d is -0.5 and +0.5" in hints("grpo")


def grad_of_one_token(ratio, advantage):
    old = torch.tensor([[0.0]])
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = grpo_loss(logps, old, logps.detach(), torch.tensor([float(advantage)]),
                              torch.ones(1, 1, dtype=torch.bool), clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    return round(logps.grad.item(), 4), metrics["clip_ratio"].item()


def test_where_the_clip_stops_the_gradient(hints):
    got = {(r, a): grad_of_one_token(r, a) for r in (1.3, 0.7) for a in (1, -1)}
    assert got == {(1.3, 1): (0.0, 1.0), (0.7, -1): (0.0, 1.0), (1.3, -1): (1.3, 0.0), (0.7, 1): (-0.7, 0.0)}
    assert "0 at (1.3, +1) and (0.7, -1), both counted in clip_ratio; +1.3 at (1.3, -1) and -0.7 at (0.7, +1)" \
        in hints("grpo")


def test_a_short_and_a_long_completion(hints):
    mask = torch.tensor([[True, False, False], [True, True, True]])
    logps = torch.zeros(2, 3, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logps, logps.detach(), logps.detach(), advantages, mask, kl_coef=0.0)
    loss.backward()
    assert loss.item() == 0.5
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, 0, 0], [0.25, 0.25, 0.25]]))
    # the GRPO paper's mean per completion, then over completions: (-1 + 1) / 2 = 0, the first token weighing 1/2
    per_completion = ((-advantages[:, None] * mask).sum(1) / mask.sum(1)).mean()
    assert per_completion.item() == 0.0
    assert "the loss is (-1 + 3) / 4 = 0.5 and every token's gradient is 1/4 in size; averaged per completion " \
        "first it would be 0, with the short answer's one token weighing 1/2 and each long one's 1/6" in hints("grpo")

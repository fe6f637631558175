"""The answers to the exercises of notes/fundamentals.md, computed from the code and compared with the
hints the note gives."""

import math

import torch

from fundamentals.autograd import Tensor, cross_entropy
from fundamentals.cnn.models import SmallCNN
from fundamentals.vae import gaussian_kl


def test_cross_entropy_gradient_of_one_row(hints):
    z = Tensor(torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64), requires_grad=True)
    cross_entropy(z, torch.tensor([0])).backward()
    assert [round(g, 3) for g in z.grad[0].tolist()] == [-0.335, 0.245, 0.090]
    assert "[-0.335, 0.245, 0.090]" in hints("fundamentals")


def test_small_cnn_parameters_by_hand(hints):
    model = SmallCNN()
    convs = [m for m in model.features if sum(p.numel() for p in m.parameters())]
    assert [sum(p.numel() for p in m.parameters()) for m in convs] == [1 * 16 * 9 + 16, 16 * 32 * 9 + 32] == [160, 4640]
    assert sum(p.numel() for p in model.head.parameters()) == 32 * 2 * 2 * 10 + 10 == 1290
    assert sum(p.numel() for p in model.parameters()) == 6090
    assert "160 + 4,640 + 1,290" in hints("fundamentals")


def test_gaussian_kl_by_hand(hints):
    kl = gaussian_kl(torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    assert kl.tolist() == [0.5, 0.5 * (math.e - 2)]
    assert round(kl[1].item(), 3) == 0.359
    assert "0.5 and 0.5 x (e - 2) = 0.359" in hints("fundamentals")

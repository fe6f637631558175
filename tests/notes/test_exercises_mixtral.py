"""The answers to the exercises of notes/mixtral.md, computed from the code and compared with the hints
the note gives."""

import math

import torch

from architectures.mixtral.model import route


def test_routing_weights_of_one_token(hints):
    weights, experts = route(torch.tensor([[2.0, 1.0, 0, 0, 0, 0, 0, 0]]), 2)
    assert experts.tolist() == [[0, 1]]
    assert [round(w, 3) for w in weights[0].tolist()] == [0.731, 0.269]
    assert math.isclose(weights[0, 0].item(), math.e**2 / (math.e**2 + math.e), rel_tol=1e-6)
    assert "e^2 / (e^2 + e) = 0.731 and 0.269" in hints("mixtral")

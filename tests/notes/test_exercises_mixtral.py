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


def test_load_balancing_loss_of_two_routers(hints):
    from architectures.mixtral.losses import load_balancing_loss

    E, k = 8, 2
    balanced = torch.full((E, E), -30.0)  # token i prefers experts i and i+1 (mod E) equally
    for i in range(E):
        balanced[i, [i, (i + 1) % E]] = 0.0
    collapsed = torch.full((64, E), -30.0)
    collapsed[:, :k] = 0.0  # every token to experts 0 and 1
    assert round(load_balancing_loss((balanced,), E, k).item(), 4) == 2.0  # f = k/E, P = 1/E: E x E x k/E^2
    assert round(load_balancing_loss((collapsed,), E, k).item(), 4) == 8.0  # f = 1, P = 1/k on k experts
    assert "balanced: 8 x 8 x (2/8 x 1/8) = 2" in hints("mixtral") and "collapsed: 8 x 2 x (1 x 1/2) = 8" in hints("mixtral")

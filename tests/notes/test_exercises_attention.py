"""The answer to the √d exercise of notes/attention.md, measured on random vectors."""

import torch


def test_dot_products_grow_with_d_and_the_scale_undoes_it(hints):
    d, n = 64, 200_000
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    dots = (q * k).sum(-1)
    assert abs(dots.var().item() / d - 1) < 0.02  # variance d, within sampling error (about 0.3% here)
    assert abs((dots / d**0.5).var().item() - 1) < 0.02
    assert "d = 64, then 1" in hints("attention")

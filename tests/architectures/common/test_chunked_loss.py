"""The chunked head + cross-entropy (`linear_cross_entropy`) equals the plain form, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from architectures.common.loss import linear_cross_entropy, lm_loss


def plain(hidden, weight, targets, reduction="mean"):
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 for bf16, as lm_loss does
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_plain_loss_with_gradients(chunk, reduction):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 21, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 21), generator=g)
    y[0, :5] = -100  # masked prompt tokens
    y[2, -3:] = -100  # padding
    ref = plain(h, w, y, reduction)
    gh, gw = torch.autograd.grad(ref * 2.5, (h, w))
    got = linear_cross_entropy(h, w, y, chunk_size=chunk, reduction=reduction)
    ch, cw = torch.autograd.grad(got * 2.5, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-12)


def test_chunked_loss_under_bf16_autocast_matches_plain_loss():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(h, w, y)
        got = linear_cross_entropy(h, w, y, chunk_size=16)
    gh, gw = torch.autograd.grad(ref, (h, w))
    ch, cw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ch, gh, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(cw, gw, rtol=2e-2, atol=1e-3)


def test_lm_loss_with_chunks_equals_plain_lm_loss(model):
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    y = torch.randint(0, model.config.vocab_size, (2, 12))
    ref, _ = lm_loss(model, (x, y))
    grads = torch.autograd.grad(ref, list(model.parameters()))
    got, _ = lm_loss(model, (x, y), chunk_size=5)
    chunked = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunk_size_below_one_is_refused():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_with_a_logit_softcap_equals_plain_loss_of_capped_logits(chunk):
    """Final-logit soft-capping (Gemma 2): the chunked loss caps each chunk's logits and chains its
    gradient through 1 - tanh^2; logits of order 10 against a cap of 3, so the cap bites."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (3 * torch.randn(40, 16, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 40, (2, 9), generator=g)
    y[1, :2] = -100
    z = F.linear(h, w)
    ref = F.cross_entropy((3.0 * torch.tanh(z / 3.0)).flatten(0, -2), y.flatten())
    gh, gw = torch.autograd.grad(ref, (h, w))
    got = linear_cross_entropy(h, w, y, chunk_size=chunk, softcap=3.0)
    ch, cw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, F.cross_entropy(z.flatten(0, -2), y.flatten()))  # the cap changed the loss

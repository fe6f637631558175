"""SSD three ways is one function: the sequential recurrence (the reference), the chunked algorithm of
"Transformers are SSMs" (arXiv:2405.21060) and the single decoding step agree on outputs, final
states and gradients, in float64 where the only differences are summation order (1e-10)."""

import pytest
import torch

from architectures.mamba2_hybrid.ssd import conv_step, segsum, ssd_chunked, ssd_sequential, ssd_step

TIGHT = dict(rtol=1e-10, atol=1e-10)


def inputs(b=2, l=13, h=4, p=3, g=2, n=5, seed=0, initial=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, B, C = r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
    dt = torch.nn.functional.softplus(r(b, l, h))  # positive step sizes
    A = -torch.exp(0.5 * r(h))  # negative decays
    h0 = r(b, h, p, n) if initial else None
    return x, dt, A, B, C, h0


def by_steps(x, dt, A, B, C, h0):
    state = h0 if h0 is not None else x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 16])
def test_chunked_equals_sequential_for_lengths_not_divisible_by_the_chunk(chunk_size):
    x, dt, A, B, C, h0 = inputs()  # T = 13
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, h0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=h0)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(s, s_ref, **TIGHT)


def test_step_by_step_decoding_equals_sequential():
    x, dt, A, B, C, h0 = inputs(initial=False)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C)
    y, s = by_steps(x, dt, A, B, C, None)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(s, s_ref, **TIGHT)


def test_a_prefix_then_the_rest_from_its_state_equals_the_whole():
    """What a cache relies on: the final state of tokens 0..k-1 is the initial state of k.."""
    x, dt, A, B, C, _ = inputs(l=20)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, 8)
    y1, s1 = ssd_chunked(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7], 8)
    y2, s2 = ssd_chunked(x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], 8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, **TIGHT)
    torch.testing.assert_close(s2, s_all, **TIGHT)


def test_gradients_of_the_three_ways_agree():
    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in inputs()]
        y, s = fn(*leaves)
        w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        ((y * w).sum() + (s ** 2).sum()).backward()
        return [t.grad for t in leaves]

    ref = grads(ssd_sequential)
    for fn in (lambda *a: ssd_chunked(*a[:5], 4, initial_state=a[5]), by_steps):
        for got, want in zip(grads(fn), ref):
            torch.testing.assert_close(got, want, **TIGHT)


def test_segsum_is_the_log_of_the_decay_products():
    a = torch.randn(6, dtype=torch.float64)
    S = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[j + 1:i + 1].sum() if j <= i else -torch.inf
            torch.testing.assert_close(S[i, j], torch.as_tensor(want, dtype=torch.float64), **TIGHT)


def test_padding_with_zero_steps_changes_neither_outputs_nor_state():
    """dt = 0 means decay exp(0) = 1 and no input: how padding tokens are kept out of the state."""
    x, dt, A, B, C, h0 = inputs(l=9)
    y, s = ssd_chunked(x, dt, A, B, C, 4, initial_state=h0)
    pad = lambda t: torch.cat([t, torch.randn_like(t[:, :3])], 1)  # noqa: E731
    dt_pad = torch.cat([dt, torch.zeros_like(dt[:, :3])], 1)
    y2, s2 = ssd_chunked(pad(x), dt_pad, A, pad(B), pad(C), 4, initial_state=h0)
    torch.testing.assert_close(y2[:, :9], y, **TIGHT)
    torch.testing.assert_close(s2, s, **TIGHT)


def test_conv_step_equals_the_causal_convolution():
    torch.manual_seed(0)
    ch, K, T = 6, 4, 9
    conv = torch.nn.Conv1d(ch, ch, K, groups=ch, padding=K - 1).double()
    x = torch.randn(2, ch, T, dtype=torch.float64)
    full = conv(x)[..., :T]  # (2, ch, T)
    window = torch.zeros(2, ch, K, dtype=torch.float64)
    for t in range(T):
        out, window = conv_step(window, x[..., t], conv.weight[:, 0], conv.bias)
        torch.testing.assert_close(out, full[..., t], **TIGHT)


def test_chunk_size_below_one_is_refused():
    x, dt, A, B, C, _ = inputs()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        ssd_chunked(x, dt, A, B, C, 0)


def test_bf16_matmul_operands_stay_within_bf16_rounding_of_the_fp32_scan():
    """matmul_dtype=bf16 rounds only the operands of the big products (the decays stay fp32), so y stays
    within a few bf16 roundings (4e-3 relative each) of the fp32 result, at T not a multiple of Q."""
    g = torch.Generator().manual_seed(0)
    b, T, h, p, n = 2, 100, 4, 8, 16
    x = torch.randn(b, T, h, p, generator=g)
    dt = torch.rand(b, T, h, generator=g) * 0.5
    A = -torch.rand(h, generator=g) - 0.5
    B, C = torch.randn(b, T, 1, n, generator=g), torch.randn(b, T, 1, n, generator=g)
    y32, final32 = ssd_chunked(x, dt, A, B, C, 32)
    y16, final16 = ssd_chunked(x, dt, A, B, C, 32, matmul_dtype=torch.bfloat16)
    scale = y32.abs().max()
    assert y16.dtype == torch.float32
    assert (y16 - y32).abs().max() <= 2e-2 * scale
    assert (final16 - final32).abs().max() <= 2e-2 * final32.abs().max()
    assert (y16 - y32).abs().max() > 0, "the bf16 operands must really be used"

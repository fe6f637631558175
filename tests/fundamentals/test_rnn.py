"""Specification of fundamentals.rnn: the written-out RNN and LSTM equal nn.RNN and nn.LSTM.

Reference: torch.nn.RNN / torch.nn.LSTM (batch_first=True, two layers) holding the same
weights (copied with load_state_dict), in float64: outputs, final states and the gradients of
every weight, the input and the initial state agree to 1e-10 (the same formulas; torch's
fused kernels sum in another order).
"""

import pytest
import torch
from torch import nn

from fundamentals.rnn import LSTM, RNN

TOL = dict(rtol=1e-10, atol=1e-10)
B, T, D, H, L = 3, 7, 5, 4, 2


def pair(ours_cls, torch_cls):
    torch.manual_seed(0)
    ref = torch_cls(D, H, num_layers=L, batch_first=True).double()
    mine = ours_cls(D, H, num_layers=L).double()
    mine.load_state_dict(ref.state_dict())  # same parameter names and shapes as torch's
    return mine, ref


def leaves(*shapes):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def check_gradients(mine, ref, mine_leaves, ref_leaves):
    for (name, p), (_, r) in zip(mine.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, **TOL, msg=f"gradient of {name}")
    for a, b in zip(mine_leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_rnn_equals_nn_rnn_in_values_and_gradients():
    mine, ref = pair(RNN, nn.RNN)
    x, h0 = leaves((B, T, D), (L, B, H))
    ours_in = [x.clone().requires_grad_(True), h0.clone().requires_grad_(True)]
    ref_in = [x.clone().requires_grad_(True), h0.clone().requires_grad_(True)]
    out, h_n = mine(*ours_in)
    out_r, h_n_r = ref(*ref_in)
    torch.testing.assert_close(out, out_r, **TOL)
    torch.testing.assert_close(h_n, h_n_r, **TOL)
    w = torch.randn(out.shape, dtype=torch.float64)
    ((out * w).sum() + h_n.sum()).backward()
    ((out_r * w).sum() + h_n_r.sum()).backward()
    check_gradients(mine, ref, ours_in, ref_in)


def test_lstm_equals_nn_lstm_in_values_and_gradients():
    mine, ref = pair(LSTM, nn.LSTM)
    x, h0, c0 = leaves((B, T, D), (L, B, H), (L, B, H))
    ours_in = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
    ref_in = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
    out, (h_n, c_n) = mine(ours_in[0], tuple(ours_in[1:]))
    out_r, (h_n_r, c_n_r) = ref(ref_in[0], tuple(ref_in[1:]))
    for a, b in ((out, out_r), (h_n, h_n_r), (c_n, c_n_r)):
        torch.testing.assert_close(a, b, **TOL)
    w = torch.randn(out.shape, dtype=torch.float64)
    ((out * w).sum() + h_n.sum() + (c_n**2).sum()).backward()  # every output path carries gradient
    ((out_r * w).sum() + h_n_r.sum() + (c_n_r**2).sum()).backward()
    check_gradients(mine, ref, ours_in, ref_in)


def test_zero_initial_state_is_the_default():
    mine, ref = pair(LSTM, nn.LSTM)
    x, = leaves((B, T, D))
    torch.testing.assert_close(mine(x)[0], ref(x)[0], **TOL)


def test_an_lstm_input_that_is_not_batch_time_features_is_a_clear_error():
    lstm = LSTM(D, H)
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, time, features\) with features=5, "
                                         r"got \(7, 5\); one sequence .* x.unsqueeze\(0\)"):
        lstm(torch.zeros(T, D))
    with pytest.raises(ValueError, match=r"features=5, got \(3, 7, 6\)"):
        lstm(torch.zeros(B, T, D + 1))

"""A vanilla (Elman) RNN and an LSTM written out step by step in torch ops.

RNN: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (Elman, "Finding Structure in Time", 1990).
LSTM: Hochreiter & Schmidhuber, "Long Short-Term Memory" (1997), with the forget gate of Gers
et al. (2000), in torch.nn.LSTM's equations and gate order (input, forget, cell, output):
    i, f, g, o = sigma(.), sigma(.), tanh(.), sigma(.)  of  W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
    c_t = f * c_{t-1} + i * g        h_t = o * tanh(c_t)
The parameters have nn.RNN's / nn.LSTM's names and shapes (weight_ih_l0, ...), so
`load_state_dict(torch_module.state_dict())` copies a torch model's weights in;
tests/fundamentals/test_rnn.py checks outputs, final states and all gradients against
nn.RNN / nn.LSTM (batch_first=True) with the same weights, to 1e-10 in float64.

Symbols: B batch, T time steps, D input features, H hidden size, L layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """One step: (B, D), (B, H) -> (B, H)."""
    return torch.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def lstm_cell(x, state, w_ih, w_hh, b_ih, b_hh):
    """One step: (B, D), ((B, H), (B, H)) -> (h, c), each (B, H)."""
    h, c = state
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H): the four gates in one matmul
    i, f, g, o = gates.chunk(4, dim=-1)
    # The cell state is updated additively (f * c + i * g), so its gradient through time is
    # multiplied by f, not by a weight matrix and a tanh' at every step: with f near 1 it
    # neither vanishes nor explodes, which is why the gates are there.
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class _Recurrent(nn.Module):
    GATES = 1  # rows of W per hidden unit: 1 for the RNN, 4 for the LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        k = 1 / math.sqrt(hidden_size)  # torch's init: every weight and bias U(-k, k)
        for layer in range(num_layers):
            d = input_size if layer == 0 else hidden_size  # layer l > 0 reads layer l-1's h
            for name, shape in (("weight_ih", (self.GATES * hidden_size, d)), ("weight_hh", (self.GATES * hidden_size, hidden_size)),
                                ("bias_ih", (self.GATES * hidden_size,)), ("bias_hh", (self.GATES * hidden_size,))):
                setattr(self, f"{name}_l{layer}", nn.Parameter(torch.empty(shape).uniform_(-k, k)))

    def layer_weights(self, layer: int):
        return [getattr(self, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            hint = ("; one sequence (time, features) needs a batch axis, x.unsqueeze(0), and token ids (batch, time) "
                    "need embedding first (nn.Embedding)") if x.dim() == 2 else ""
            raise ValueError(f"{name} expects input of shape (batch, time, features) with features={self.input_size}, "
                             f"got {tuple(x.shape)}{hint}")

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)  # (L, B, H)


class RNN(_Recurrent):
    """nn.RNN(input_size, hidden_size, num_layers, batch_first=True) with tanh, written out."""

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), h0 (L, B, H) or None -> outputs (B, T, H) of the last layer, h_n (L, B, H)."""
        self.check_input(x)
        h0 = self.zeros(x) if h0 is None else h0
        finals = []
        for layer in range(self.num_layers):
            h, outs = h0[layer], []
            for t in range(x.shape[1]):
                h = rnn_cell(x[:, t], h, *self.layer_weights(layer))
                outs.append(h)
            x = torch.stack(outs, dim=1)  # (B, T, H): the next layer's input
            finals.append(h)
        return x, torch.stack(finals)


class LSTM(_Recurrent):
    """nn.LSTM(input_size, hidden_size, num_layers, batch_first=True), written out."""

    GATES = 4

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, T, D), state (h0, c0) each (L, B, H) or None -> outputs (B, T, H), (h_n, c_n)."""
        self.check_input(x)
        h0, c0 = (self.zeros(x), self.zeros(x)) if state is None else state
        hs, cs = [], []
        for layer in range(self.num_layers):
            h, c, outs = h0[layer], c0[layer], []
            for t in range(x.shape[1]):
                h, c = lstm_cell(x[:, t], (h, c), *self.layer_weights(layer))
                outs.append(h)
            x = torch.stack(outs, dim=1)  # (B, T, H)
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))


def make_lstm(cell: str, input_size: int, hidden_size: int, num_layers: int) -> nn.Module:
    """"ours" (the LSTM above, a Python loop over time) or "torch" (nn.LSTM, the same math, fused).
    Both take (batch, time, features) and return (outputs, (h, c))."""
    if cell == "ours":
        return LSTM(input_size, hidden_size, num_layers)
    if cell == "torch":
        return nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
    raise ValueError(f"--cell {cell!r} is not one of 'ours', 'torch'")

"""Modules on the from-scratch autograd: a module is parameters plus a function of them.

`Module` registers every `Tensor` with requires_grad=True and every sub-`Module` assigned to
it, the way torch.nn.Module does, so `parameters()` finds them all for the optimizer. The
layers mirror torch.nn's definitions and initialisation (Linear's U(-1/sqrt(in), 1/sqrt(in)),
Embedding's N(0, 1), LayerNorm's biased variance and eps=1e-5); tests/fundamentals/test_nn.py
checks their values and gradients against torch.nn.functional to 1e-10.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from fundamentals.autograd import Tensor


def parameter(data) -> Tensor:
    """A leaf Tensor that the optimizer updates."""
    return Tensor(data, requires_grad=True)


class Module:
    """A function with state: `forward` computes, `parameters()` lists what training changes."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ assigned {name!r} before calling super().__init__(); "
                               f"call super().__init__() first so parameters and submodules can be registered")
        if isinstance(value, Tensor) and value.requires_grad:
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args):
        return self.forward(*args)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for name, p in self._parameters.items():
            yield prefix + name, p
        for name, m in self._modules.items():
            yield from m.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.data.numel() for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True) -> "Module":
        """Dropout drops only in training mode; `eval()` turns it off for evaluation."""
        object.__setattr__(self, "training", mode)
        for m in self._modules.values():
            m.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)


class Linear(Module):
    """y = x W^T + b, with W of shape (out_features, in_features) as in torch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        # U(-k, k), k = 1/sqrt(fan_in): torch's default (kaiming_uniform with a=sqrt(5) reduces to this)
        k = 1 / math.sqrt(in_features)
        self.weight = parameter(torch.empty(out_features, in_features, dtype=torch.float64).uniform_(-k, k, generator=generator))
        self.bias = parameter(torch.empty(out_features, dtype=torch.float64).uniform_(-k, k, generator=generator)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"Linear({self.weight.shape[1]}, {self.weight.shape[0]}) got input of shape {tuple(x.shape)}: "
                             f"its last axis must be {self.weight.shape[1]}")
        y = x @ self.weight.T  # (..., out)
        return y + self.bias if self.bias is not None else y


class Embedding(Module):
    """A lookup table: row i of the weight is the vector of token i. Its gradient is a scatter-add."""

    def __init__(self, num_embeddings: int, embedding_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.weight = parameter(torch.randn(num_embeddings, embedding_dim, generator=generator, dtype=torch.float64))

    def forward(self, ids) -> Tensor:
        ids = torch.as_tensor(ids.data if isinstance(ids, Tensor) else ids).long()
        n = self.weight.shape[0]
        if ids.numel() and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"Embedding of {n} rows got ids from {ids.min().item()} to {ids.max().item()}; "
                             f"ids must be in [0, {n})")
        return self.weight[ids]  # (*ids.shape, embedding_dim)


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis (Ba et al. 2016, arXiv:1607.06450)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = parameter(torch.ones(dim, dtype=torch.float64))  # gamma
        self.bias = parameter(torch.zeros(dim, dtype=torch.float64))  # beta

    def forward(self, x: Tensor) -> Tensor:
        centered = x - x.mean(-1, keepdims=True)  # (..., dim)
        var = (centered * centered).mean(-1, keepdims=True)  # biased (divides by dim), as torch does
        return centered * (var + self.eps) ** -0.5 * self.weight + self.bias


class Dropout(Module):
    """Zero each element with probability p in training, scale the rest by 1/(1-p) so the expectation
    is unchanged; the identity in eval mode (Srivastava et al. 2014)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout probability p={p} must be in [0, 1); p=1 would drop everything")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape) >= self.p).to(torch.float64) / (1 - self.p)
        return x * Tensor(keep)  # a constant: the gradient flows only through the kept elements


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh()


class Sequential(Module):
    """Modules applied in order; registered as "0", "1", ... like torch.nn.Sequential."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential item {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

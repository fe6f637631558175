"""Reverse-mode automatic differentiation on a graph of `Tensor`s, from scratch.

Each operation returns a new `Tensor` that remembers its inputs (`_parents`) and a closure
(`_backward`) mapping the gradient of the output to the gradients of the inputs: one link of
the chain rule. `Tensor.backward` orders the graph topologically and applies the links from
the output back to the leaves, summing where a value fed several operations.

torch tensors are plain float64 storage here: every `data` is detached and every op runs
under `torch.no_grad()`, so torch's own autograd never sees the graph. Tested in
tests/fundamentals/test_autograd.py against torch.autograd (1e-10) and finite differences.
Reference: Karpathy's micrograd (scalar version of the same idea); Baydin et al., "Automatic
Differentiation in Machine Learning: a Survey" (2018, arXiv:1502.05767).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

DTYPE = torch.float64  # double precision so gradient checks can be tight (1e-10), not because training needs it
_GRAD_ENABLED = [True]  # a one-element list so `no_grad` can flip it from outside the class


@contextlib.contextmanager
def no_grad():
    """Build no graph inside the block (evaluation): results keep no parents and need no memory for backward."""
    _GRAD_ENABLED[0], before = False, _GRAD_ENABLED[0]
    try:
        yield
    finally:
        _GRAD_ENABLED[0] = before


def _as_storage(data) -> torch.Tensor:
    if isinstance(data, Tensor):
        return data.data
    if isinstance(data, torch.Tensor):  # a private float64 copy, cut off from any torch graph it was in
        return data.detach().to(DTYPE, copy=True)
    return torch.as_tensor(data, dtype=DTYPE)


def _lift(x) -> "Tensor":
    """A Python number, list or torch tensor becomes a constant Tensor (no gradient)."""
    return x if isinstance(x, Tensor) else Tensor(x)


def _broadcast_shape(a: "Tensor", b: "Tensor", op: str) -> torch.Size:
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"cannot broadcast shapes {tuple(a.shape)} and {tuple(b.shape)} for '{op}': aligned from the right, each "
            f"pair of sizes must be equal or one of them 1; reshape one operand (e.g. x.reshape(-1, 1))"
        ) from None


def unbroadcast(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `grad` (the output's shape) back to an input's `shape`.

    Broadcasting copies an input along new leading axes and along its size-1 axes; each copy
    contributed to the output, so the chain rule adds their gradients up.
    """
    while grad.dim() > len(shape):  # leading axes the input did not have
        grad = grad.sum(0)
    for i, n in enumerate(shape):  # axes where the input had size 1
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def _axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


class Tensor:
    """An array, whether it needs a gradient, and how it was computed."""

    def __init__(self, data, requires_grad: bool = False, _parents: tuple = (), _op: str = ""):
        self.data: torch.Tensor = _as_storage(data)
        self.requires_grad = requires_grad
        self.grad: torch.Tensor | None = None  # d(output of the last backward) / d(self), self's shape
        self._parents = _parents
        self._op = _op  # for repr and debugging: which operation made this node
        self._backward: Callable[[torch.Tensor], tuple] = lambda g: ()

    # ------------------------------------------------------------------ basics
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.dim())

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data.tolist() if self.data.numel() <= 8 else tuple(self.shape)}{grad}, op={self._op!r})"

    def __len__(self) -> int:
        return len(self.data)

    def item(self) -> float:
        return self.data.item()

    def zero_grad(self) -> None:
        self.grad = None

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def _make(self, data: torch.Tensor, parents: tuple, op: str, backward: Callable) -> "Tensor":
        """The output node of an op: it joins the graph only if some parent needs a gradient."""
        needs = _GRAD_ENABLED[0] and any(p.requires_grad for p in parents)
        out = Tensor(data, requires_grad=needs, _parents=parents if needs else (), _op=op)
        if needs:
            out._backward = backward
        return out

    # ------------------------------------------------------------------ elementwise binary ops
    def __add__(self, other) -> "Tensor":
        other = _lift(other)
        _broadcast_shape(self, other, "+")
        return self._make(self.data + other.data, (self, other), "+",
                          lambda g: (unbroadcast(g, self.shape), unbroadcast(g, other.shape)))

    def __mul__(self, other) -> "Tensor":
        other = _lift(other)
        _broadcast_shape(self, other, "*")
        a, b = self.data, other.data
        return self._make(a * b, (self, other), "*",
                          lambda g: (unbroadcast(g * b, self.shape), unbroadcast(g * a, other.shape)))

    def __truediv__(self, other) -> "Tensor":
        other = _lift(other)
        _broadcast_shape(self, other, "/")
        a, b = self.data, other.data
        # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
        return self._make(a / b, (self, other), "/",
                          lambda g: (unbroadcast(g / b, self.shape), unbroadcast(-g * a / (b * b), other.shape)))

    def __pow__(self, other) -> "Tensor":
        other = _lift(other)
        _broadcast_shape(self, other, "**")
        a, b = self.data, other.data
        out = a**b

        def backward(g):
            ga = unbroadcast(g * b * a ** (b - 1), self.shape)
            # d(a^b)/db = a^b log a; computed only when the exponent needs it, since log a is nan for a < 0
            gb = unbroadcast(g * out * torch.log(a), other.shape) if other.requires_grad else None
            return ga, gb

        return self._make(out, (self, other), "**", backward)

    def __matmul__(self, other) -> "Tensor":
        other = _lift(other)
        a, b = self.data, other.data
        if a.dim() == 0 or b.dim() == 0:
            raise ValueError(f"@ needs tensors of at least 1 dimension, got shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}; use * to scale by a scalar")
        if a.shape[-1] != b.shape[-2 if b.dim() > 1 else -1]:
            raise ValueError(f"cannot multiply shapes {tuple(a.shape)} @ {tuple(b.shape)}: the last axis of the left "
                             f"({a.shape[-1]}) must equal the second-to-last of the right; transpose one operand")
        # A 1-D operand acts as a row (left) or column (right) vector, as in torch and numpy.
        a2 = a.unsqueeze(0) if a.dim() == 1 else a  # (..., n, k)
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b  # (..., k, m)

        def backward(g):
            g2 = g.unsqueeze(-1) if b.dim() == 1 else g
            g2 = g2.unsqueeze(-2) if a.dim() == 1 else g2  # (..., n, m)
            ga = unbroadcast(g2 @ b2.transpose(-1, -2), a2.shape).reshape(a.shape)  # dL/dA = G B^T
            gb = unbroadcast(a2.transpose(-1, -2) @ g2, b2.shape).reshape(b.shape)  # dL/dB = A^T G
            return ga, gb

        return self._make(a @ b, (self, other), "@", backward)

    def __neg__(self) -> "Tensor":
        return self * -1.0

    def __sub__(self, other) -> "Tensor":
        return self + (-_lift(other))

    def __radd__(self, other) -> "Tensor":
        return _lift(other) + self

    def __rsub__(self, other) -> "Tensor":
        return _lift(other) - self

    def __rmul__(self, other) -> "Tensor":
        return _lift(other) * self

    def __rtruediv__(self, other) -> "Tensor":
        return _lift(other) / self

    def __rpow__(self, other) -> "Tensor":
        return _lift(other) ** self

    def __rmatmul__(self, other) -> "Tensor":
        return _lift(other) @ self

    # ------------------------------------------------------------------ elementwise unary ops
    def exp(self) -> "Tensor":
        out = torch.exp(self.data)
        return self._make(out, (self,), "exp", lambda g: (g * out,))

    def log(self) -> "Tensor":
        x = self.data
        return self._make(torch.log(x), (self,), "log", lambda g: (g / x,))

    def tanh(self) -> "Tensor":
        out = torch.tanh(self.data)
        return self._make(out, (self,), "tanh", lambda g: (g * (1 - out * out),))

    def sigmoid(self) -> "Tensor":
        out = torch.sigmoid(self.data)
        return self._make(out, (self,), "sigmoid", lambda g: (g * out * (1 - out),))

    def relu(self) -> "Tensor":
        mask = (self.data > 0).to(DTYPE)  # the subgradient at 0 is taken as 0, as torch does
        return self._make(self.data * mask, (self,), "relu", lambda g: (g * mask,))

    # ------------------------------------------------------------------ reductions
    def sum(self, axis=None, keepdims: bool = False) -> "Tensor":
        axes = _axes(axis, self.ndim)
        out = self.data.sum(dim=axes, keepdim=keepdims) if axes else self.data.clone()

        def backward(g):
            for a in sorted(axes) if not keepdims else ():
                g = g.unsqueeze(a)  # put back the summed axes as size 1 ...
            return (g.expand(self.shape),)  # ... and copy: every input element added into its sum once

        return self._make(out, (self,), "sum", backward)

    def mean(self, axis=None, keepdims: bool = False) -> "Tensor":
        n = 1
        for a in _axes(axis, self.ndim):
            n *= self.shape[a]
        return self.sum(axis, keepdims) / n

    def max(self, axis=None, keepdims: bool = False) -> "Tensor":
        axes = _axes(axis, self.ndim)
        kept = self.data.amax(dim=axes, keepdim=True)  # (..., 1, ...) to compare against

        def backward(g):
            g = g if keepdims else g.reshape(kept.shape)
            hit = (self.data == kept).to(DTYPE)
            # Ties share the gradient equally (torch.amax does the same); random data has none.
            return (g * hit / hit.sum(dim=axes, keepdim=True),)

        out = kept if keepdims else kept.reshape([n for i, n in enumerate(self.shape) if i not in axes])
        return self._make(out, (self,), "max", backward)

    def softmax(self, axis: int = -1) -> "Tensor":
        s = torch.softmax(self.data, dim=axis)
        # Jacobian of softmax is diag(s) - s s^T, so J^T g = s * (g - <g, s>)
        return self._make(s, (self,), "softmax", lambda g: (s * (g - (g * s).sum(axis, keepdim=True)),))

    def log_softmax(self, axis: int = -1) -> "Tensor":
        shifted = self.data - self.data.amax(dim=axis, keepdim=True)  # exp cannot overflow
        out = shifted - shifted.exp().sum(axis, keepdim=True).log()
        # d(x_i - logsumexp x)/dx_j = delta_ij - softmax_j, so J^T g = g - softmax * sum(g)
        return self._make(out, (self,), "log_softmax", lambda g: (g - out.exp() * g.sum(axis, keepdim=True),))

    # ------------------------------------------------------------------ shape ops
    def reshape(self, *shape) -> "Tensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._make(self.data.reshape(shape), (self,), "reshape", lambda g: (g.reshape(self.shape),))

    def transpose(self, a: int, b: int) -> "Tensor":
        return self._make(self.data.transpose(a, b), (self,), "transpose", lambda g: (g.transpose(a, b),))

    @property
    def T(self) -> "Tensor":
        if self.ndim != 2:
            raise ValueError(f".T is the transpose of a 2-D tensor, this one has shape {tuple(self.shape)}; "
                             f"use .transpose(a, b) to swap two chosen axes")
        return self.transpose(0, 1)

    def __getitem__(self, index) -> "Tensor":
        index = _torch_index(index)
        out = self.data[index]

        def backward(g):
            # Which flat input position each output element was read from; index_add_ then sums
            # into it, so an element picked twice (x[[0, 0]]) receives both gradients.
            where = torch.arange(self.data.numel()).reshape(self.shape)[index]
            grad = torch.zeros(self.data.numel(), dtype=DTYPE)
            grad.index_add_(0, where.reshape(-1), g.reshape(-1))
            return (grad.reshape(self.shape),)

        return self._make(out, (self,), "getitem", backward)

    # ------------------------------------------------------------------ backward
    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf that requires a gradient."""
        if not self.requires_grad:
            raise ValueError("backward() on a Tensor that does not require a gradient: none of the Tensors it was "
                             "computed from has requires_grad=True (or it was computed under no_grad())")
        if grad is None:
            if self.data.numel() != 1:
                raise ValueError(f"backward() without a gradient needs a scalar, but this Tensor has shape "
                                 f"{tuple(self.shape)}; reduce it first (.sum() or .mean()) or pass "
                                 f"backward(grad) with a gradient of shape {tuple(self.shape)}")
            grad = torch.ones_like(self.data)
        grad = _as_storage(grad)
        if grad.shape != self.shape:
            raise ValueError(f"backward(grad): grad has shape {tuple(grad.shape)} but the Tensor has shape "
                             f"{tuple(self.shape)}; they must match")

        grads = {id(self): grad}  # d(self)/d(node) for the nodes reached so far
        for node in reversed(_topological_order(self)):  # outputs before the inputs they were made from
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if not node._parents:
                node.grad = g.clone() if node.grad is None else node.grad + g  # leaves accumulate, as in torch
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if parent.requires_grad and pg is not None:
                    # a node used twice gets the sum of both paths' gradients: the multivariate chain rule
                    grads[id(parent)] = grads[id(parent)] + pg if id(parent) in grads else pg


def _topological_order(root: Tensor) -> list[Tensor]:
    """Every node that `root` depends on, each after all of its parents (iterative DFS: no recursion limit)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in seen)
    return order


def _torch_index(index):
    """Lists, numpy arrays and Tensors inside an index become torch long tensors; slices stay."""
    parts = index if isinstance(index, tuple) else (index,)
    out = []
    for p in parts:
        if isinstance(p, Tensor):
            p = p.data.long()
        elif isinstance(p, list) or type(p).__module__ == "numpy":
            p = torch.as_tensor(p)
        out.append(p)
    return tuple(out) if isinstance(index, tuple) else out[0]

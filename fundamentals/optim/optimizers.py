"""SGD (momentum, Nesterov, weight decay), Adam and AdamW on the from-scratch autograd.

An optimizer holds references to the parameters, a learning rate, and per-parameter state
(a momentum buffer; Adam's two moment estimates and a step count). `step()` reads each `.grad`
and updates `.data` in place. The update rules follow torch.optim's documented algorithms
line by line, and tests/fundamentals/test_optim.py checks the parameters after 100 steps on the
same gradients equal torch.optim's (1e-6; in float64 they agree to ~1e-15).
Papers: Sutskever et al. 2013 (momentum, Nesterov form); Kingma & Ba, "Adam" (2014,
arXiv:1412.6980); Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2017,
arXiv:1711.05101).
"""

from __future__ import annotations

import math

import torch

from fundamentals.autograd import Tensor


class Optimizer:
    def __init__(self, params, lr: float):
        name = type(self).__name__
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError(f"{name} got no parameters: pass model.parameters() of a model that has some (a "
                             f"generator can be consumed only once, so build it again for a second optimizer)")
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise ValueError(f"{name}: parameter {i} is a {type(p).__name__}"
                                 f"{'' if not isinstance(p, Tensor) else ' with requires_grad=False'}; "
                                 f"pass Tensors created with requires_grad=True (nn.parameter(...))")
        if lr < 0:
            raise ValueError(f"{name}: learning rate {lr} must be >= 0")
        self.lr = lr  # a schedule sets this before each step
        self.state: list[dict] = [{} for _ in self.params]  # per parameter, same order as self.params

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        for p, state in zip(self.params, self.state):
            if p.grad is not None:  # a parameter the loss did not reach is left alone, as in torch
                self.update(p.data, p.grad, state)

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """p <- p - lr * d, d = g + wd p (momentum: d = buffer = mu buffer + (1 - dampening) d; Nesterov: d + mu buffer)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening, self.weight_decay, self.nesterov = momentum, dampening, weight_decay, nesterov

    def update(self, p, g, state):
        d = g + self.weight_decay * p if self.weight_decay else g  # L2 decay: the gradient of wd/2 |p|^2
        if self.momentum:
            if "buffer" not in state:
                state["buffer"] = d.clone()  # torch starts the buffer at the first gradient, undamped
            else:
                state["buffer"].mul_(self.momentum).add_(d, alpha=1 - self.dampening)
            # Nesterov evaluates the step "ahead": the current gradient plus the momentum it will get
            d = d + self.momentum * state["buffer"] if self.nesterov else state["buffer"]
        p.sub_(self.lr * d)


class Adam(Optimizer):
    """Per-coordinate steps lr * m_hat / (sqrt(v_hat) + eps) from bias-corrected moment estimates.

    weight_decay here is L2 added to the gradient (torch.optim.Adam's meaning), so it is scaled by
    1/sqrt(v) like the gradient: heavily-updated weights are barely decayed. AdamW fixes that.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{type(self).__name__}: betas {betas} must each be in [0, 1)")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def decay(self, p, g):
        return g + self.weight_decay * p if self.weight_decay else g

    def update(self, p, g, state):
        b1, b2 = self.betas
        g = self.decay(p, g)
        if not state:
            state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["t"] += 1
        state["m"].mul_(b1).add_(g, alpha=1 - b1)  # m: running mean of g
        state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)  # v: running mean of g^2
        # Both start at 0, so early estimates are biased towards 0 by the factor 1 - beta^t.
        m_hat = state["m"] / (1 - b1 ** state["t"])
        v_hat = state["v"] / (1 - b2 ** state["t"])
        p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p (1 - lr wd) apart from the adaptive step."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)

    def decay(self, p, g):
        p.mul_(1 - self.lr * self.weight_decay)  # every weight shrinks by the same fraction
        return g


def warmup_cosine(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to max_lr over warmup_steps, then half a cosine down to min_lr at total_steps.

    step counts from 0, the same rule as training.optimizer.lr_at: the first step already has
    lr > 0, and steps past total_steps stay at min_lr.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))

"""The causal language model's objective: mean next-token cross-entropy, and its chunked form.

A batch is (x, y), token ids of shape (B, T) with y = x shifted left by one; the loss is
the mean next-token cross-entropy in nats per token. Every family's pretraining loss
(`Family.loss` in architectures/registry.py) is this one, plus the auxiliary terms of a mixture
of experts where the family has them. Post-training methods bring their own batch and loss in
the same shape, `loss_fn(model, batch) -> (loss, metrics)`, and reuse `linear_cross_entropy`.
Every row here has block_size targets, so a mean per micro-batch is already a mean per token; a
loss whose rows hold different numbers of targets returns their sum with metrics["num_tokens"]
instead (training/trainer.py explains why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.utils.wrappers import unwrap

IGNORE_INDEX = -100  # a target that is not trained (a prompt token, padding), as torch's cross_entropy names it


def lm_loss(model, batch, chunk_size: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy. chunk_size > 0: through `linear_cross_entropy`, which never
    holds the full (B*T, V) logits (`--loss-chunk`); the value and gradients are the same."""
    x, y = batch  # (B, T), (B, T)
    if chunk_size:
        hidden = model(x, hidden_only=True)  # (B, T, D)
        return linear_cross_entropy(hidden, output_head(model).weight, y, chunk_size,
                                    softcap=output_softcap(model)), {}
    logits = model(x)  # (B, T, V)
    # Cross-entropy in fp32: under bf16 autocast the logits are bf16, whose 8-bit mantissa
    # would round the log-sum-exp.
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss, {}


def output_head(model) -> torch.nn.Linear:
    """The model's lm_head, through a DDP wrapper (`.module`) if there is one."""
    return unwrap(model).lm_head


def output_softcap(model) -> float | None:
    """The model's final-logit soft-cap (`CausalLM.logit_softcap`), which a loss applying the head
    itself must apply too, or None."""
    return getattr(unwrap(model), "logit_softcap", None)


# ---------------------------------------------------------------------------- the chunked loss
#
# The plain loss materialises logits for every token: N tokens x V vocabulary entries, and then
# an fp32 copy for the softmax. For Llama 3's V = 128,256 and one row of 2,048 tokens that is
# 2,048 x 128,256 x (2 bytes bf16 + 4 bytes fp32 + 4 bytes for the fp32 gradient) = 2.6 GB,
# more than the activations of a 1B model's whole stack. The head and the loss are cheap to
# fuse: the gradient of cross-entropy with respect to the logits z of one token is known in
# closed form, softmax(z) - onehot(y), so each chunk of tokens can compute its logits, its loss
# and its gradients at once, during the forward pass, and free the logits before the next chunk:
#     dL/dh = (softmax(z) - onehot(y)) W        (C, D) for a chunk of C tokens
#     dL/dW = sum over chunks (softmax(z) - onehot(y))^T h      (V, D)
# The backward pass then only scales the stored gradients by the incoming one. Peak memory for
# the head is one chunk's logits, C x V, whatever N is. (The idea of Liger Kernel's fused linear
# cross-entropy, Hsu et al. 2024, arXiv:2410.10989, written here in PyTorch.)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(h W^T, y), ignoring y == -100, with gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                softcap: float | None = None):
        # hidden (N, D), weight (V, D), targets (N,). Runs under the caller's autocast: the matmuls
        # are bf16 where the plain head's would be, the softmax is fp32 as in lm_loss.
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]  # (C, D), (C,)
            logits = F.linear(h, weight)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (C, V), at least fp32
            if softcap is not None:  # logits s = c * tanh(z / c), as the model's compute_logits makes them
                squashed = torch.tanh(logits / softcap)  # (C, V)
                logits = squashed * softcap
            valid = y != IGNORE_INDEX
            safe = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            total += ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
            # d(sum of losses)/d logits = softmax - onehot, zero on ignored rows; reuses logits' memory.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), safe] -= 1
            grad *= valid[:, None]
            if softcap is not None:  # chain rule through the cap: ds/dz = 1 - tanh(z / c)^2
                grad *= 1 - squashed.square()
            # Under autocast the two matmuls below run in bf16 like the head's own; without it, in
            # the weight's dtype.
            g = grad if torch.is_autocast_enabled(h.device.type) else grad.to(weight.dtype)
            grad_hidden[start:start + chunk_size] = (g @ weight).to(hidden.dtype)  # (C, D)
            if grad_weight is not None:
                grad_weight += (g.transpose(0, 1) @ h).to(grad_weight.dtype)  # (V, D), summed in fp32
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has_weight_grad = grad_weight is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype)
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096,
                         reduction: str = "mean", softcap: float | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without materialising the logits of all tokens.

    hidden (..., D), weight (V, D) (the output head's), targets (...) with -100 where nothing is
    trained. reduction "mean" (over the targets that are not -100) or "sum"; softcap: the logits are
    softcap * tanh(z / softcap) (a model's final-logit soft-capping), or z when None. Equal in value
    and gradients to `F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten())`
    with the cap applied to the logits (tests/architectures/common/test_chunked_loss.py)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} tokens but targets has {y.shape[0]}")
    total = LinearCrossEntropy.apply(h, weight, y, chunk_size, softcap)
    if reduction == "sum":
        return total
    return total / (y != IGNORE_INDEX).sum().clamp_min(1)

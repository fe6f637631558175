"""Triton kernels the families share, and the check that Triton can run here.

`silu_and_mul`: SwiGLU's activation on one GEMM's output, [gate ; up] (M, 2F) -> silu(gate) * up (M, F),
in one pass.

When one matrix multiply computes both halves (the stacked SwiGLU experts of Mixtral and DeepSeek,
`StackedExperts` in moe.py, whose gate_up_proj is [W_gate; W_up]), `gate, up = h.chunk(2, -1)` gives
two strided views, and eager PyTorch runs silu, the product and, in the backward, three more
products and a concatenation as separate kernels over those strided halves (the slower,
non-vectorised elementwise path on a GPU). `silu_and_mul` does the forward in one Triton kernel and
the backward in another, which writes the gradient of [gate ; up] directly. Elsewhere (a CPU, no
Triton) it is the plain formula:

    out   = silu(g) * u = g sigmoid(g) u
    d g   = d out * u * sigmoid(g) (1 + g (1 - sigmoid(g)))
    d u   = d out * silu(g)

Tested against the plain formula, values and gradients, on a GPU
(tests/architectures/common/test_kernels.py). The name is vLLM's for the same fused operation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BLOCK = 1024  # elements of the (M, F) output per program


def silu_and_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """(..., 2F) -> (..., F): silu of the first half times the second."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(h_ptr, out_ptr, n, F_: tl.constexpr, BLOCK_: tl.constexpr):
        # flat index into the (M, F) output, in int64: M x 2F passes 2^31 for large MoE batches
        i = tl.program_id(0).to(tl.int64) * BLOCK_ + tl.arange(0, BLOCK_)
        live = i < n
        row, col = i // F_, i % F_
        g = tl.load(h_ptr + row * 2 * F_ + col, mask=live, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F_ + F_ + col, mask=live, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def backward_kernel(h_ptr, dout_ptr, dh_ptr, n, F_: tl.constexpr, BLOCK_: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK_ + tl.arange(0, BLOCK_)
        live = i < n
        row, col = i // F_, i % F_
        g = tl.load(h_ptr + row * 2 * F_ + col, mask=live, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F_ + F_ + col, mask=live, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + i, mask=live, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = d * u * s * (1 + g * (1 - s))
        du = d * g * s
        tl.store(dh_ptr + row * 2 * F_ + col, dg.to(dh_ptr.dtype.element_ty), mask=live)
        tl.store(dh_ptr + row * 2 * F_ + F_ + col, du.to(dh_ptr.dtype.element_ty), mask=live)

    return forward_kernel, backward_kernel


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        forward_kernel, _ = _kernels()
        M, two_f = h.shape
        out = torch.empty(M, two_f // 2, dtype=h.dtype, device=h.device)
        n = out.numel()
        forward_kernel[(-(-n // BLOCK),)](h, out, n, F_=two_f // 2, BLOCK_=BLOCK)
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> torch.Tensor:
        _, backward_kernel = _kernels()
        (h,) = ctx.saved_tensors
        dout = dout.contiguous()
        dh = torch.empty_like(h)
        n = dout.numel()
        backward_kernel[(-(-n // BLOCK),)](h, dout, dh, n, F_=h.shape[1] // 2, BLOCK_=BLOCK)
        return dh


@functools.cache
def triton_importable() -> bool:
    """Whether the `triton` package imports (it ships with CUDA builds of torch, not with CPU ones).
    Kernels are compiled on first use, never at import time, so the CPU suite runs without it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """h (M, 2F) = [gate ; up] -> silu(gate) * up (M, F): one Triton kernel each way on a GPU for a
    contiguous 2-D h, the plain formula anywhere else."""
    if h.is_cuda and h.dim() == 2 and h.is_contiguous() and triton_importable():
        return _SiluAndMul.apply(h)
    return silu_and_mul_reference(h)

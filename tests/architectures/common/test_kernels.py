"""The fused SwiGLU activation equals silu(gate) * up, values and gradients (on a GPU, where its Triton
kernels run; elsewhere `silu_and_mul` is the plain formula itself, so only the GPU test can fail)."""

import pytest
import torch

from architectures.common.kernels import silu_and_mul, silu_and_mul_reference, triton_importable

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and triton_importable()),
                                  reason="the fused kernels need a CUDA GPU and triton (run on the GPU machine)")


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,F", [(1, 16), (37, 1408), (1000, 24)])  # M * F not a multiple of the block
def test_fused_silu_and_mul_matches_the_formula_with_gradients(M, F, dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (3 * torch.randn(M, 2 * F, device="cuda", generator=g)).to(dtype).requires_grad_()
    ref_h = h.detach().float().requires_grad_()
    dout = torch.randn(M, F, device="cuda", generator=g).to(dtype)
    out = silu_and_mul(h)
    out.backward(dout)
    ref = silu_and_mul_reference(ref_h)
    ref.backward(dout.float())
    scale = ref.abs().max().item()
    assert out.dtype == dtype and out.shape == (M, F)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(h.grad.float(), ref_h.grad, rtol=tol, atol=tol * ref_h.grad.abs().max().item())

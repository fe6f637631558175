"""Quantize-on-write in one Triton kernel: a step's new K or V rows into int8 or fp8 blocks of the paged pool.

What it replaces. `KVFormat.encode` (inference/quantized_kv.py) quantizes with the formulas of
inference/quantization.py, written as torch ops: upcast, |x|, max, divide, guard the zero scale,
divide, round, clamp, cast, and the scale's clamp and cast, then two index copies into the pool.
That is about a dozen kernels per tensor, for K and V, in every layer of every decode step, where
each moves a few kilobytes: in a CUDA graph their fixed cost of a few microseconds each, not their
bytes, is what they cost (about 0.4 ms per step of a 16-layer model). This kernel does the same
arithmetic for one token per program and writes the codes and the scale straight to the token's
slot, one launch per tensor.

Same numbers, bit for bit (tests/inference/test_quantized_kv.py, on a GPU): for each token n and
KV head k, over the head's d numbers x,
    s = max|x| / QMAX                 (QMAX = 127 for int8, 448 for fp8), in fp32
    codes = round(x / s) clamped to [-127, 127] (int8; round half to even, as torch.round)
            or x / s clamped to [-448, 448] and rounded to e4m3 (fp8)
    a zero row has s = 0 and is divided by 1 instead, so its codes are 0;
the scale is stored as fp16, clamped to fp16's largest finite value first. The two divisions are
done as torch does them on a GPU: max|x| / QMAX, a tensor divided by a Python number, is
max|x| x (1 / QMAX) with the reciprocal rounded to fp32 first (ATen's CUDA division takes that
shortcut for a scalar divisor; on the CPU it divides, so the two devices can differ in the last bit
of a scale), and x / s is an IEEE division (`div_rn`; Triton's plain `/` on fp32 is approximate).

Triton is imported when the kernel is first needed, never at import time (the CPU suite runs
without it); `write_quantized_rows` is called only where `fused_write_reason` is None.
"""

from __future__ import annotations

import functools

import torch

from inference.quantization import FP8_DTYPE, FP8_MAX, INT8_MAX
from inference.triton_paged_attention import power_of_two, triton_unavailable_reason


def fused_write_reason(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> str | None:
    """None if `write_quantized_rows` can write x (N, K, d) into `codes` / `scales`, else why not: the
    formats it stores, a power-of-2 width (tl.arange), and the decode kernel's conditions (a CUDA GPU,
    triton, and Ada or later for e4m3)."""
    if codes.dtype not in (torch.int8, FP8_DTYPE) or scales.dtype != torch.float16:
        return f"the fused write stores int8 or e4m3 codes with fp16 scales, not {codes.dtype} / {scales.dtype}"
    d = x.shape[-1]
    if not power_of_two(d):
        return f"the fused write needs a power-of-2 head width >= 16, got {d}"
    return triton_unavailable_reason(x.device, d, codes.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_write_kernel(x_ptr, codes_ptr, scales_ptr, slots_ptr, stride_xn, stride_xk,
                              stride_cslot, stride_ck, stride_sslot, stride_sk, K,
                              K_PAD: tl.constexpr, D: tl.constexpr, QMAX: tl.constexpr, INV_QMAX: tl.constexpr,
                              FP8: tl.constexpr):
        n = tl.program_id(0)  # the token
        heads = tl.arange(0, K_PAD)
        dims = tl.arange(0, D)
        ok = heads < K
        x = tl.load(x_ptr + n * stride_xn + heads[:, None] * stride_xk + dims[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)  # (K_PAD, D)
        scale = tl.max(tl.abs(x), 1) * INV_QMAX  # (K_PAD,) one per head; INV_QMAX: fp32(1 / QMAX)
        safe = tl.where(scale == 0.0, 1.0, scale)
        y = tl.math.div_rn(x, safe[:, None])
        if FP8:
            codes = tl.minimum(tl.maximum(y, -QMAX), QMAX).to(tl.float8e4nv)
        else:
            # Round half to even, as torch.round: adding 1.5 x 2^23 leaves no bits below the units, so the
            # fp32 addition itself rounds (to nearest, ties to even); subtracting it back is exact.
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
            codes = ((y + 12582912.0) - 12582912.0).to(tl.int8)
        slot = tl.load(slots_ptr + n).to(tl.int64)  # the token's flat slot in the pool: block * bs + offset
        tl.store(codes_ptr + slot * stride_cslot + heads[:, None] * stride_ck + dims[None, :], codes,
                 mask=ok[:, None])
        big = 65504.0  # fp16's largest finite value
        stored = tl.minimum(tl.maximum(scale, -big), big).to(tl.float16)
        tl.store(scales_ptr + slot * stride_sslot + heads * stride_sk, stored, mask=ok)

    return quantize_write_kernel


def write_quantized_rows(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor) -> None:
    """x: (N, K, d) float rows of N tokens; codes: (num_slots, K, d) int8 or float8_e4m3fn; scales:
    (num_slots, K, 1) fp16; slots: (N,) integer. Row n goes to codes[slots[n]] quantized per head, its
    scales to scales[slots[n]]: what `KVFormat.encode` followed by index copies stores, in one launch."""
    N, K, d = x.shape
    if x.stride(-1) != 1 or codes.stride(-1) != 1:
        raise ValueError("x and codes need a contiguous last dimension")
    if N == 0:
        return
    fp8 = codes.dtype == FP8_DTYPE
    qmax = FP8_MAX if fp8 else float(INT8_MAX)
    _kernel()[(N,)](x, codes, scales, slots, x.stride(0), x.stride(1), codes.stride(0), codes.stride(1),
                    scales.stride(0), scales.stride(1), K, K_PAD=max(1, 1 << (K - 1).bit_length()), D=d,
                    QMAX=qmax, INV_QMAX=1.0 / qmax, FP8=fp8, num_warps=1 if K * d <= 1024 else 4)

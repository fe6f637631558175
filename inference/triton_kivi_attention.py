"""A Triton kernel for the decode step over an int4 (KIVI) paged cache: 4-bit codes read in place.

Paper: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (Liu et al., 2024,
arXiv:2402.02750), whose layout inference/quantized_kv.py stores: keys quantized per channel over a
group of G tokens, values per token over their d channels, each group with a scale s and a zero z
(x = (code - z) x s, codes 0..15), and the newest tokens, fewer than G, kept in full precision in the
sequence's *residual* until their group fills. In the paged engine a group is a block (bs = G).
The loop is that of inference/triton_paged_attention.py (one program per sequence, KV head and part of
the context; online softmax in base 2); what is new is how a block is read. The kernel itself is in
inference/triton_kivi_kernel.py, which imports triton (so this module imports it only to launch).
Tested against the gather path on the same pool: tests/inference/test_quantized_kv.py, on a GPU.

Symbols: B sequences, H query heads, K KV heads, r = H/K, d head_dim, G = bs tokens per block.
What one block of one KV head holds (`KVFormat.group_parts`):
    keys    codes (d, G/2) bytes: channel c's G codes, two a byte (token 2i high nibble, 2i+1 low);
            scale, zero (d,): one per channel;
    values  codes (G, d/2) bytes: token t's d codes, two a byte (channel 2j high, 2j+1 low);
            scale, zero (G,): one per token.

Dequantizing a block would cost work for each of its 2 x G x d numbers. The kernel moves the scales
and zeros to the other side of each product instead:
    score_t = sum_c q_c (code_ct - z_c) s_c = sum_c (q_c s_c) code_ct - sum_c (q_c s_c) z_c
so the query is scaled once per block (d multiplies per query head), the codes go to the tensor cores
as they are, and the zeros become one number per query head. Likewise for the values:
    out_c += sum_t p_t s_t (code_tc - z_t) = sum_t (p_t s_t) code_tc - sum_t (p_t s_t) z_t.
The scaled query is split into two bf16 parts, hi = bf16(q s) and lo = bf16(q s - hi), each with its own
dot: a single bf16 q_c s_c is rounded once per block, the same error for all its G keys, and that left
the output 2-5 times further from fp32 than the gather path, which rounds each dequantized key on its
own (notes/quantization.md). A code n becomes a bf16 number without a conversion instruction: the bits 0x4300 | n are the bf16
number 128 + n exactly (bf16 counts in steps of 1 between 128 and 256), so the products read 128 + n,
and the zero term subtracts 128 + z instead of z. The zero terms use the same (q_c s_c) and bf16-rounded
(p_t s_t) as the products, so the 128s cancel up to fp32 summation, and the kernel differs from
dequantize-then-attend by bf16 roundings only, as the int8 kernel does.

Nibbles are never interleaved back: the high and low nibbles of a key byte are the even and odd tokens
of the block, and two dots give their scores (R, G/2) each; the high and low nibbles of a value byte are
the even and odd channels, and the output is kept as two halves (R, d/2) that are interleaved only when
stored. So a block costs 4 dots for the keys and 4 for the values, each at least 16 wide, and no reshape.
The residual (the tokens past the last full block) is one more tile in bf16, read by part 0.
"""

from __future__ import annotations

import math

import torch

from inference.split_decode import default_splits, merge_splits, split_outputs
from inference.triton_paged_attention import power_of_two, triton_unavailable_reason


def kivi_unavailable_reason(device, head_dim: int, block_size: int) -> str | None:
    """None if the int4 kernel can read this cache, else why not (its shapes first, then the device)."""
    if head_dim % 2 or block_size % 2 or not power_of_two(head_dim // 2) or not power_of_two(block_size // 2):
        return (f"the int4 decode kernel needs a head_dim and a block size (the key group) that are powers of 2 "
                f">= 32, got head_dim={head_dim}, block_size={block_size}")
    return triton_unavailable_reason(device, head_dim)


def paged_int4_decode_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                                v: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                                k_residual: torch.Tensor, v_residual: torch.Tensor, slots: torch.Tensor,
                                block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                                scale: float | None = None, splits: int | None = None,
                                num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """One bf16 query per sequence against its int4 (KIVI) paged K/V. q: (B, H, d) bf16;
    k: (num_blocks, 1, K, d, G/2) uint8 with k_scale, k_zero (num_blocks, 1, K, d, 1);
    v: (num_blocks, 1, G, K, d/2) uint8 with v_scale, v_zero (num_blocks, 1, G, K, 1);
    k_residual, v_residual: (num_slots, G, K, d) bf16, slot slots[b] holding sequence b's tokens
    G * (ctx // G) .. ctx - 1; block_tables (B, nb) and context_lens (B,) as for `paged_decode_attention`.
    splits: parts per context (None: enough to fill the GPU). Returns (B, H, d)."""
    B, H, d = q.shape
    K, G = k.shape[2], 2 * k.shape[-1]
    if H % K:
        raise ValueError(f"{H} query heads do not divide into {K} KV heads")
    if q.dtype != torch.bfloat16 or k_residual.dtype != torch.bfloat16:
        raise ValueError(f"the int4 decode kernel computes in bf16; got q {q.dtype}, residual {k_residual.dtype}")
    if k.shape[1:] != (1, K, d, G // 2) or v.shape[1:] != (1, G, K, d // 2):
        raise ValueError(f"int4 blocks must be keys (n, 1, K, d, G/2) and values (n, 1, G, K, d/2); got "
                         f"{tuple(k.shape)} and {tuple(v.shape)} for q {tuple(q.shape)}")
    if k_residual.shape[1:] != (G, K, d) or v_residual.shape != k_residual.shape:
        raise ValueError(f"residuals must be (slots, {G}, {K}, {d}); got {tuple(k_residual.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v, k_residual, v_residual)):
        raise ValueError("q, the codes and the residuals need a contiguous last dimension")
    if k_scale.shape[1:] != (1, K, d, 1) or v_scale.shape[1:] != (1, G, K, 1) or \
            k_zero.shape != k_scale.shape or v_zero.shape != v_scale.shape:
        raise ValueError(f"key scales and zeros must be (n, 1, K, d, 1) and value ones (n, 1, G, K, 1); got "
                         f"{tuple(k_scale.shape)} and {tuple(v_scale.shape)}")
    if k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        raise ValueError("each scale and its zero must share one layout")
    reason = kivi_unavailable_reason(q.device, d, G)
    if reason:
        raise RuntimeError(reason + "; use inference.paged_attention.paged_attention instead")
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    r = H // K
    r_block = min(max(16, 1 << (r - 1).bit_length()), 64)
    if r > r_block:
        raise ValueError(f"the int4 decode kernel serves up to 64 query heads per KV head, got {r}")
    nb = block_tables.shape[1]
    splits = default_splits(B, K, nb * G, G, q.device) if splits is None else splits
    split_blocks = -(-nb // splits)
    splits = -(-nb // split_blocks)
    out, m, l, out_strides, ml_strides = split_outputs(q, splits, d)
    qk_scale = math.log2(math.e) * (1 / math.sqrt(d) if scale is None else scale)
    from inference.triton_kivi_kernel import kivi_decode_kernel  # imports triton: GPU only

    kivi_decode_kernel[(B, K, splits)](
        q, k, k_scale, k_zero, v, v_scale, v_zero, k_residual, v_residual, block_tables, context_lens, slots,
        out, m, l, q.stride(0), q.stride(1), k.stride(0), k.stride(2), k.stride(3),
        k_scale.stride(0), k_scale.stride(2), k_scale.stride(3), v.stride(0), v.stride(2), v.stride(3),
        v_scale.stride(0), v_scale.stride(2), v_scale.stride(3),
        k_residual.stride(0), k_residual.stride(1), k_residual.stride(2),
        block_tables.stride(0), *out_strides, *ml_strides, qk_scale, split_blocks,
        R=r, R_BLOCK=r_block, D=d, G=G, SPLIT=splits > 1, num_warps=num_warps, num_stages=num_stages)
    return merge_splits(out, m, l, q.dtype) if splits > 1 else out

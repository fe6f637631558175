"""The Triton kernel of the int4 (KIVI) paged decode step, compiled on first use.

inference/triton_kivi_attention.py explains what it computes (the scales moved across the products,
nibbles read as bf16 numbers 128 + n, the residual as one more tile), checks its inputs and launches it
(`paged_int4_decode_attention`). The kernel lives in a module of its own because a function decorated
with triton.jit needs triton at import time, which CPU builds of torch lack: only the launcher imports
this module, when a kernel runs. Symbols as there: R = H/K query heads per KV head (padded to
R_BLOCK), D head_dim, G tokens per block (the key group).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kivi_decode_kernel(q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, kr_ptr, vr_ptr,
                       tables_ptr, ctx_ptr, slots_ptr, out_ptr, m_ptr, l_ptr,
                       stride_qb, stride_qh,
                       stride_kblk, stride_khead, stride_kchan,  # key codes (blocks, 1, K, d, G/2)
                       stride_ksblk, stride_kshead, stride_kschan,  # key scales and zeros (blocks, 1, K, d, 1)
                       stride_vblk, stride_vtok, stride_vhead,  # value codes (blocks, 1, G, K, d/2)
                       stride_vsblk, stride_vstok, stride_vshead,  # value scales and zeros (blocks, 1, G, K, 1)
                       stride_rslot, stride_rtok, stride_rhead,  # residuals (slots, G, K, d)
                       stride_tb, stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                       qk_scale,  # softmax scale * log2(e)
                       split_blocks,  # full blocks per part of the context
                       R: tl.constexpr, R_BLOCK: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                       SPLIT: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    full = ctx // G  # blocks already quantized; tokens full * G .. ctx - 1 are in the residual
    rows = tl.arange(0, R_BLOCK)
    row_ok = rows < R
    heads = kh * R + rows
    dims = tl.arange(0, D)
    half = tl.arange(0, D // 2)  # value channel pairs: 2j (high nibble) and 2j + 1 (low)
    pairs = tl.arange(0, G // 2)  # token pairs: 2i (high nibble) and 2i + 1 (low)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # (R_BLOCK, D)

    m = tl.full((R_BLOCK,), float("-inf"), tl.float32)
    l = tl.zeros((R_BLOCK,), tl.float32)
    acc_even = tl.zeros((R_BLOCK, D // 2), tl.float32)  # channels 0, 2, 4, ...
    acc_odd = tl.zeros((R_BLOCK, D // 2), tl.float32)  # channels 1, 3, 5, ...
    first = split * split_blocks
    last = tl.minimum(full, first + split_blocks)
    for j in range(first, last):
        block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        # keys: scale the query by the block's per-channel scales, then two dots with the raw codes
        kbase = block * stride_kblk + kh * stride_khead
        kcodes = tl.load(k_ptr + kbase + dims[:, None] * stride_kchan + pairs[None, :]).to(tl.int16)  # (D, G/2)
        # each nibble n as the bf16 number 128 + n, from its bits: even tokens high, odd tokens low
        k_even = ((kcodes >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        k_odd = ((kcodes & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
        sbase = block * stride_ksblk + kh * stride_kshead + dims * stride_kschan
        kscale = tl.load(ks_ptr + sbase).to(tl.float32)  # (D,)
        kzero = tl.load(kz_ptr + sbase).to(tl.float32)
        qs = q * kscale[None, :]  # (R_BLOCK, D) fp32, as two bf16 parts: qs = hi + lo to 16 bits
        qs_hi = qs.to(tl.bfloat16)
        qs_lo = (qs - qs_hi.to(tl.float32)).to(tl.bfloat16)
        shift = tl.sum(qs * (kzero + 128.0)[None, :], 1)  # (R_BLOCK,)
        s_even = (tl.dot(qs_hi, k_even) + tl.dot(qs_lo, k_even) - shift[:, None]) * qk_scale  # (R_BLOCK, G/2)
        s_odd = (tl.dot(qs_hi, k_odd) + tl.dot(qs_lo, k_odd) - shift[:, None]) * qk_scale
        m_new = tl.maximum(m, tl.maximum(tl.max(s_even, 1), tl.max(s_odd, 1)))
        alpha = tl.exp2(m - m_new)
        p_even = tl.exp2(s_even - m_new[:, None])
        p_odd = tl.exp2(s_odd - m_new[:, None])
        l = l * alpha + tl.sum(p_even, 1) + tl.sum(p_odd, 1)
        # values: the even tokens' rows and the odd tokens' rows, each split into even and odd channels
        vbase = block * stride_vblk + kh * stride_vhead
        vsbase = block * stride_vsblk + kh * stride_vshead
        tok_even = 2 * pairs
        tok_odd = 2 * pairs + 1
        v_even = tl.load(v_ptr + vbase + tok_even[:, None] * stride_vtok + half[None, :]).to(tl.int16)  # (G/2, D/2)
        v_odd = tl.load(v_ptr + vbase + tok_odd[:, None] * stride_vtok + half[None, :]).to(tl.int16)
        # (even tokens, odd tokens) x (even channels: high nibbles, odd channels: low), as 128 + n in bf16
        ve_e = ((v_even >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        ve_o = ((v_even & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
        vo_e = ((v_odd >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        vo_o = ((v_odd & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
        ps_even = (p_even * tl.load(vs_ptr + vsbase + tok_even * stride_vstok).to(tl.float32)[None, :])
        ps_odd = (p_odd * tl.load(vs_ptr + vsbase + tok_odd * stride_vstok).to(tl.float32)[None, :])
        ps_even = ps_even.to(tl.bfloat16)
        ps_odd = ps_odd.to(tl.bfloat16)
        z_even = tl.load(vz_ptr + vsbase + tok_even * stride_vstok).to(tl.float32) + 128.0  # (G/2,)
        z_odd = tl.load(vz_ptr + vsbase + tok_odd * stride_vstok).to(tl.float32) + 128.0
        vshift = tl.sum(ps_even.to(tl.float32) * z_even[None, :], 1) + \
            tl.sum(ps_odd.to(tl.float32) * z_odd[None, :], 1)  # (R_BLOCK,)
        acc_even = acc_even * alpha[:, None] + tl.dot(ps_even, ve_e) + tl.dot(ps_odd, vo_e) - vshift[:, None]
        acc_odd = acc_odd * alpha[:, None] + tl.dot(ps_even, ve_o) + tl.dot(ps_odd, vo_o) - vshift[:, None]
        m = m_new

    n_res = ctx - full * G
    if (split == 0) & (n_res > 0):  # the residual: up to G - 1 newest tokens in bf16, read by part 0
        slot = tl.load(slots_ptr + b).to(tl.int64)
        tok = tl.arange(0, G)
        live = tok < n_res
        rbase = slot * stride_rslot + tok * stride_rtok + kh * stride_rhead  # (G,)
        k = tl.load(kr_ptr + rbase[:, None] + dims[None, :], mask=live[:, None], other=0.0)  # (G, D)
        s = tl.dot(q.to(k.dtype), tl.trans(k)) * qk_scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v_e = tl.load(vr_ptr + rbase[:, None] + 2 * half[None, :], mask=live[:, None], other=0.0)  # (G, D/2)
        v_o = tl.load(vr_ptr + rbase[:, None] + 2 * half[None, :] + 1, mask=live[:, None], other=0.0)
        acc_even = acc_even * alpha[:, None] + tl.dot(p.to(v_e.dtype), v_e)
        acc_odd = acc_odd * alpha[:, None] + tl.dot(p.to(v_o.dtype), v_o)
        m = m_new

    o_rows = b * stride_ob + heads[:, None] * stride_oh
    if SPLIT:
        base = out_ptr + o_rows + split * stride_os
        tl.store(base + 2 * half[None, :], acc_even, mask=row_ok[:, None])
        tl.store(base + 2 * half[None, :] + 1, acc_odd, mask=row_ok[:, None])
        ml = b * stride_mb + heads * stride_mh + split
        tl.store(m_ptr + ml, m, mask=row_ok)
        tl.store(l_ptr + ml, l, mask=row_ok)
    else:
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_rows + 2 * half[None, :], (acc_even / l[:, None]).to(dt), mask=row_ok[:, None])
        tl.store(out_ptr + o_rows + 2 * half[None, :] + 1, (acc_odd / l[:, None]).to(dt), mask=row_ok[:, None])

"""A Triton kernel for the decode step of paged attention: K/V read in place through the block table.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180), whose CUDA kernel reads the blocks where they lie;
the online softmax is that of "FlashAttention" (Dao et al., 2022, arXiv:2205.14135) and of
"Online normalizer calculation for softmax" (Milakov & Gimelshein, 2018, arXiv:1805.02867).
Tested against `paged_attention_reference` (inference/paged_attention.py), the oracle that
walks the block table one slot at a time: tests/inference/test_paged_attention.py, bf16 on a GPU.

Why a kernel: in a decode step every sequence has one new query, and the batched
`paged_attention` first gathers each sequence's blocks, padded to the longest table, into a
contiguous copy (B x S x K x d for K and again for V, every layer, every step) that SDPA then
reads again. The kernel reads each live K/V slot once, straight from the pool, and nothing else.

Symbols (as in inference/paged_attention.py): B sequences, H query heads, K KV heads,
r = H/K query heads per KV head, d head_dim, bs block size, ctx[b] keys of sequence b.

The algorithm. One program per (sequence b, KV head k), so a grid of (B, K):
1. load the r query heads that share KV head k, (r, d), padded to R_PAD rows (tl.dot needs
   at least 16): GQA costs nothing, the r heads read each K/V tile once, together;
2. walk the sequence's keys TILE tokens at a time (TILE = several blocks): token t of the
   sequence is slot t % bs of physical block table[b, t // bs], so one tile loads TILE block
   ids, then TILE rows of d numbers of K, and later of V, from wherever they lie;
3. scores s = q k^T / sqrt(d), (R_PAD, TILE), tokens t >= ctx masked to -inf;
4. online softmax in fp32: keep the running max m and sum l of exp(s - m) per query row, and
   the running output acc = sum exp(s - m) v; when a tile raises the max to m', rescale l and
   acc by exp(m - m') first. After the last tile, out = acc / l: the exact softmax, in one pass.
Scores use exp2 with log2(e) folded into the scale (one multiply less per score).

No host synchronisation and fixed launch shapes, so it is captured in the engine's CUDA graphs.
One program walks a whole context: 64 sequences x 8 KV heads make 512 programs, which read K/V
at about 1.5 TB/s on an H100, under half its peak (notes/paged-attention.md), and a batch of a
few long sequences would leave most SMs idle. FlashDecoding (Dao et al., 2023) splits each
context over several programs and merges their (m, l, acc); this kernel does not, yet.

Quantized caches (int8, fp8; inference/quantized_kv.py) pass `k_scale` and `v_scale`, one scale
per token and head, and the kernel dequantizes as it reads, with the gather path's formula
x = code x scale, the scale moved out of the sums where it is a common factor: a key's scale
multiplies its score, s_t = (q . code_t) x scale_t, and a value's scale its softmax weight,
acc += (p_t x scale_t) code_t. The codes (integers up to 127, or e4m3 numbers) are exact in bf16,
fp16 and fp32, so the dot products read them unrounded; the scales cost one multiply per token, not
per number. tests/inference/test_quantized_kv.py (on a GPU) and inference/bench_quantized_kv.py
check the kernel's output against the gather path's.

Triton is imported when the kernel is first needed, never at import time: the CPU test suite
runs where Triton, or a GPU it could compile for, is missing.
"""

from __future__ import annotations

import functools
import math

import torch

# Keys per loop iteration (4 blocks of 16; a power of 2, as tl.arange needs). With the launch
# defaults (4 warps, 2 stages) it is within 10% of the fastest of the 27 settings that
# `python -m inference.bench_paged_decode --sweep` times on an H100 (notes/paged-attention.md).
TILE_TOKENS = 64


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unavailable_reason(device: torch.device | str, head_dim: int,
                              cache_dtype: torch.dtype | None = None) -> str | None:
    """None if the kernel can run here (on a cache of `cache_dtype`, if given), else why not (a sentence for an
    error or a test skip)."""
    if torch.device(device).type != "cuda":
        return f"the Triton paged-attention kernel needs a CUDA GPU, and the model is on {torch.device(device)}"
    if not torch.cuda.is_available():
        return "the Triton paged-attention kernel needs a CUDA GPU, and torch sees none"
    if not _triton_importable():
        return "the Triton paged-attention kernel needs the `triton` package (pip install triton)"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"the Triton paged-attention kernel needs head_dim a power of 2 >= 16, got {head_dim}"
    if cache_dtype is not None and cache_dtype == getattr(torch, "float8_e4m3fn", None):
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):  # Triton converts e4m3 codes on Ada, Hopper and later only
            return (f"the Triton paged-attention kernel reads fp8 (e4m3) codes on GPUs of compute capability >= 8.9, "
                    f"and this one has {capability[0]}.{capability[1]}")
    return None


@functools.cache
def _kernel():
    """Compile-on-first-use: defining a @triton.jit function needs triton, so it lives in here."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr, ks_ptr, vs_ptr,
                            stride_qb, stride_qh, stride_kblk, stride_kslot, stride_khead,
                            stride_vblk, stride_vslot, stride_vhead, stride_tb, stride_ob, stride_oh,
                            stride_ksblk, stride_ksslot, stride_kshead, stride_vsblk, stride_vsslot, stride_vshead,
                            qk_scale,  # 1/sqrt(d) * log2(e): scores in base 2
                            R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                            TILE: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr):
        b = tl.program_id(0)  # sequence
        kh = tl.program_id(1)  # KV head; it serves query heads kh * R .. kh * R + R - 1
        ctx = tl.load(ctx_ptr + b)  # keys 0 .. ctx-1 are visible (the new token's own key included)
        rows = tl.arange(0, R_PAD)
        dims = tl.arange(0, D)
        heads = kh * R + rows
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=rows[:, None] < R, other=0.0)  # (R_PAD, D); padding rows are zeros, never stored

        m = tl.full((R_PAD,), float("-inf"), tl.float32)  # running max of the scores, per query row
        l = tl.zeros((R_PAD,), tl.float32)  # running sum of exp2(s - m)
        acc = tl.zeros((R_PAD, D), tl.float32)  # running sum of exp2(s - m) * v
        for start in range(0, ctx, TILE):
            tok = start + tl.arange(0, TILE)  # (TILE,) logical positions
            live = tok < ctx
            # The block table: logical block t // bs -> physical block; slot t % bs inside it.
            block = tl.load(tables_ptr + b * stride_tb + tok // BS, mask=live, other=0).to(tl.int64)
            k_rows = block * stride_kblk + (tok % BS) * stride_kslot + kh * stride_khead  # (TILE,)
            k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=live[:, None], other=0.0)  # (TILE, D)
            if QUANT:  # codes -> q's dtype (exactly); each key's scale multiplies its score
                ks = tl.load(ks_ptr + block * stride_ksblk + (tok % BS) * stride_ksslot + kh * stride_kshead,
                             mask=live, other=0.0).to(tl.float32)  # (TILE,)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (ks * qk_scale)[None, :]
            else:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (R_PAD, TILE), fp32
            s = tl.where(live[None, :], s, float("-inf"))
            # Every tile holds at least one live token (start < ctx), so m_new is finite and the
            # first tile's rescale factor exp2(-inf - m_new) is 0, wiping the zero-initialised state.
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)  # (R_PAD,) how much the old state shrinks
            p = tl.exp2(s - m_new[:, None])  # (R_PAD, TILE)
            l = l * alpha + tl.sum(p, 1)
            v_rows = block * stride_vblk + (tok % BS) * stride_vslot + kh * stride_vhead
            v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=live[:, None], other=0.0)  # (TILE, D)
            if QUANT:  # each value's scale multiplies its softmax weight
                vs = tl.load(vs_ptr + block * stride_vsblk + (tok % BS) * stride_vsslot + kh * stride_vshead,
                             mask=live, other=0.0).to(tl.float32)  # (TILE,)
                acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(q.dtype), v.to(q.dtype),
                                                    input_precision=PRECISION)
            else:
                # p in the cache's dtype for the tensor cores (as FlashAttention does), summed in fp32.
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < R)

    return paged_decode_kernel


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           tile: int = TILE_TOKENS, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """One query per sequence against its paged K/V. q: (B, H, d); caches: (num_blocks, bs, K, d)
    with the last dimension contiguous; block_tables: (B, nb) integer, entries past a sequence's
    last block are never read; context_lens: (B,) integer >= 1, the keys each query sees
    (positions 0 .. ctx-1; in a decode step the new token's own key is the last); scale: the
    softmax scale of the scores, 1/sqrt(d) if None. Returns (B, H, d).
    k_scale, v_scale: for int8 or fp8 caches, (num_blocks, bs, K, 1) scales (any float dtype): the
    cache then holds codes, dequantized as code x scale; None for plain caches.
    tile, num_warps, num_stages: launch settings (inference/bench_paged_decode.py sweeps them).
    """
    B, H, d = q.shape
    _, bs, K, _ = k_cache.shape
    if H % K:
        raise ValueError(f"{H} query heads do not divide into {K} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension (head_dim)")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have one row per query, {B}")
    reason = triton_unavailable_reason(q.device, d)
    if reason:
        raise RuntimeError(reason + "; use inference.paged_attention.paged_attention instead")
    quant = k_scale is not None
    if quant != (v_scale is not None):
        raise ValueError("give both k_scale and v_scale (a quantized cache) or neither (a plain one)")
    if quant and (k_scale.shape != (*k_cache.shape[:3], 1) or v_scale.shape != (*v_cache.shape[:3], 1)):
        raise ValueError(f"scales must be (num_blocks, bs, K, 1), one per token and head; got {tuple(k_scale.shape)} "
                         f"and {tuple(v_scale.shape)} for caches {tuple(k_cache.shape)}")
    if not quant and k_cache.dtype != q.dtype:
        raise ValueError(f"a {k_cache.dtype} cache needs its scales (k_scale, v_scale), or a cache of q's dtype "
                         f"{q.dtype}")
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unused pointers when not quantized
    r = H // K
    out = torch.empty(B, H, d, dtype=q.dtype, device=q.device)
    # Matters for fp32 caches only (the tests' exact-token settings): true fp32 products, not
    # TF32's 10-bit mantissa. bf16 and fp16 operands go to the tensor cores as they are.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _kernel()[(B, K)](
        q, k_cache, v_cache, block_tables, context_lens, out, ks, vs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1),
        vs.stride(2), math.log2(math.e) * (1 / math.sqrt(d) if scale is None else scale),
        R=r, R_PAD=max(16, 1 << (r - 1).bit_length()), D=d, BS=bs, TILE=tile,
        PRECISION=precision, QUANT=quant, num_warps=num_warps, num_stages=num_stages)
    return out

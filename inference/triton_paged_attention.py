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
few long sequences would leave most SMs idle. With `splits` > 1 each context is cut into parts,
one program per part, and the parts' (acc, m, l) are merged afterwards (`merge_splits`, in
inference/split_decode.py), as FlashDecoding does (Dao et al., 2023); the default, 1, writes the output
directly.

Sliding windows and soft-caps (`window`, `softcap`): a windowed layer's program starts its walk at the
window's first key, max(0, ctx - window), so its reads stop growing with the context (and splits cut the
window, not the table); a soft-capped layer's scores pass through softcap * tanh(s / softcap) before the
online softmax. tests/inference/test_sliding_window.py checks both against the reference on a GPU.

Multi-head latent attention (DeepSeek-V3) reads its latent cache with the same kernel
(`paged_latent_decode_attention`): one KV head whose key is the whole cached row [c_kv ; k^R]
(576 numbers, walked as a dot over the first 512 and a second over the last 64, since tl.arange
needs powers of 2) and whose value is the row's first 512 numbers, taken from the key tile
already loaded (`values_in_keys`). With 128 query heads on one KV head a program serves 64 of
them (`heads_per_program`), and the context is split to fill the GPU (`default_splits`).

Quantized caches (int8, fp8; inference/quantized_kv.py) pass `k_scale` and `v_scale`, one scale
per token and head, and the kernel dequantizes as it reads, with the gather path's formula
x = code x scale, the scale moved out of the sums where it is a common factor: a key's scale
multiplies its score, s_t = (q . code_t) x scale_t, and a value's scale its softmax weight,
acc += (p_t x scale_t) code_t. The codes (integers up to 127, or e4m3 numbers) are exact in bf16,
fp16 and fp32, so the dot products read them unrounded; the scales cost one multiply per token, not
per number. tests/inference/test_quantized_kv.py (on a GPU) and inference/benchmarks/quantized_kv.py
check the kernel's output against the gather path's.

Triton is imported when the kernel is first needed, never at import time: the CPU test suite
runs where Triton, or a GPU it could compile for, is missing.
"""

from __future__ import annotations

import functools
import math

import torch

from architectures.common.kernels import triton_importable
from inference.quantization import FP8_DTYPE
from inference.split_decode import default_splits, merge_splits, split_outputs

# Keys per loop iteration (4 blocks of 16; a power of 2, as tl.arange needs). With the launch
# defaults (4 warps, 2 stages) it is within 10% of the fastest of the 27 settings that
# `python -m inference.benchmarks.paged_decode --sweep` times on an H100 (notes/paged-attention.md).
TILE_TOKENS = 64
# Keys per iteration for one-byte codes (int8, fp8): 128 codes are the bytes of 64 bf16 numbers.
CODE_TILE_TOKENS = 128
# Registers per thread for those tiles (Triton's `maxnreg`). Left free, the int8 kernel takes 144 (its codes
# become bf16 through byte permutes and an add, fp8's through conversion instructions, which need fewer):
# 3 programs of 4 warps per SM, 396 at once on an H100's 132 SMs, so 32 sequences x 8 KV heads x 2 parts
# ran in two waves. Capped at 128, 4 fit per SM, with no spills (the compiler's resource report, sm_90).
CODE_MAX_REGISTERS = 128
# int8 codes over long contexts (tables of >= LONG_CONTEXT keys): tiles of 256, 164 us per layer on 32 x 8k
# against 182 with 128; below that 128 stays (64 sequences of U[32, 512] + 128: 25 us against 27). fp8
# gains nothing from 256 (177 against 175 us), so it keeps 128.
INT8_LONG_TILE_TOKENS, LONG_CONTEXT = 256, 4096


def power_of_two(n: int) -> bool:
    """A width tl.arange and tl.dot accept: a power of 2, at least 16."""
    return n >= 16 and not n & (n - 1)


def key_split(key_dim: int) -> tuple[int, int] | None:
    """A key width as the kernel walks it: (D, D_EXTRA), D the largest power of 2 <= key_dim and D_EXTRA the
    rest, 0 or itself a power of 2 >= 16 (tl.arange and tl.dot need powers of 2); None if it cannot be split.
    64 -> (64, 0); MLA's latent key 576 = 512 + 64 -> (512, 64)."""
    if key_dim < 16:
        return None
    main = 1 << (key_dim.bit_length() - 1)
    extra = key_dim - main
    return (main, extra) if extra == 0 or power_of_two(extra) else None


def triton_unavailable_reason(device: torch.device | str, head_dim: int,
                              cache_dtype: torch.dtype | None = None, value_dim: int | None = None) -> str | None:
    """None if the kernel can run here (on a cache of `cache_dtype`, if given; keys of `head_dim` and values of
    `value_dim` numbers, head_dim if None), else why not (a sentence for an error or a test skip)."""
    if torch.device(device).type != "cuda":
        return f"the Triton paged-attention kernel needs a CUDA GPU, and the model is on {torch.device(device)}"
    if not torch.cuda.is_available():
        return "the Triton paged-attention kernel needs a CUDA GPU, and torch sees none"
    if not triton_importable():
        return "the Triton paged-attention kernel needs the `triton` package (pip install triton)"
    if key_split(head_dim) is None:
        return (f"the Triton paged-attention kernel needs a key width that is a power of 2 >= 16, or one plus "
                f"another (576 = 512 + 64), got {head_dim}")
    value_dim = head_dim if value_dim is None else value_dim
    if not power_of_two(value_dim):
        return f"the Triton paged-attention kernel needs a value width that is a power of 2 >= 16, got {value_dim}"
    if cache_dtype is not None and cache_dtype == FP8_DTYPE:
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
    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr, ks_ptr, vs_ptr,
                            stride_qb, stride_qh, stride_kblk, stride_kslot, stride_khead,
                            stride_vblk, stride_vslot, stride_vhead, stride_tb,
                            stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                            stride_ksblk, stride_ksslot, stride_kshead, stride_vsblk, stride_vsslot, stride_vshead,
                            qk_scale,  # softmax scale * log2(e): scores in base 2 (with SOFTCAP: the scale alone)
                            split_len,  # keys per split of the context (a multiple of TILE)
                            window,  # a query sees the last `window` keys of its context (2**30: all of them)
                            cap_log2e, two_over_cap,  # SOFTCAP: softcap * log2(e) and 2 * log2(e) / softcap
                            R: tl.constexpr, R_BLOCK: tl.constexpr, D: tl.constexpr, D_EXTRA: tl.constexpr,
                            DV: tl.constexpr, BS: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
                            QUANT: tl.constexpr, V_IS_K: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr):
        b = tl.program_id(0)  # sequence
        kh = tl.program_id(1) // tl.cdiv(R, R_BLOCK)  # KV head
        hb = tl.program_id(1) % tl.cdiv(R, R_BLOCK)  # which block of R_BLOCK of its r query heads
        split = tl.program_id(2)  # which part of the context
        # keys 0 .. ctx-1 are visible (the new token's own key included). Positions are int32 (the engine passes
        # int64): 64-bit t // bs and t % bs for every key are several instructions each.
        ctx = tl.load(ctx_ptr + b).to(tl.int32)
        rows = hb * R_BLOCK + tl.arange(0, R_BLOCK)
        row_ok = rows < R
        heads = kh * R + rows
        dims = tl.arange(0, D)
        vdims = tl.arange(0, DV)
        q_rows = b * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_ptr + q_rows + dims[None, :], mask=row_ok[:, None], other=0.0)  # (R_BLOCK, D); padding rows: 0
        if D_EXTRA > 0:  # the key's last D_EXTRA numbers (MLA: the shared RoPE key), a second, smaller dot
            xdims = D + tl.arange(0, D_EXTRA)
            q_x = tl.load(q_ptr + q_rows + xdims[None, :], mask=row_ok[:, None], other=0.0)  # (R_BLOCK, D_EXTRA)

        m = tl.full((R_BLOCK,), float("-inf"), tl.float32)  # running max of the scores, per query row
        l = tl.zeros((R_BLOCK,), tl.float32)  # running sum of exp2(s - m)
        acc = tl.zeros((R_BLOCK, DV), tl.float32)  # running sum of exp2(s - m) * v
        # keys ctx - window .. ctx - 1 are visible: the window's first position, not 0, starts the walk
        lo = tl.maximum(ctx - window, 0) + split * split_len
        hi = tl.minimum(ctx, lo + split_len)
        for start in range(lo, hi, TILE):
            tok = start + tl.arange(0, TILE)  # (TILE,) logical positions
            live = tok < hi
            # The block table: logical block t // bs -> physical block; slot t % bs inside it.
            block = tl.load(tables_ptr + b * stride_tb + tok // BS, mask=live, other=0).to(tl.int64)
            k_rows = block * stride_kblk + (tok % BS) * stride_kslot + kh * stride_khead  # (TILE,)
            k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=live[:, None], other=0.0)  # (TILE, D)
            if QUANT:  # codes -> q's dtype (exactly); each key's scale multiplies its score
                ks = tl.load(ks_ptr + block * stride_ksblk + (tok % BS) * stride_ksslot + kh * stride_kshead,
                             mask=live, other=0.0).to(tl.float32)  # (TILE,)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (ks * qk_scale)[None, :]
            else:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (R_BLOCK, TILE), fp32
                if D_EXTRA > 0:
                    k_x = tl.load(k_ptr + k_rows[:, None] + xdims[None, :], mask=live[:, None], other=0.0)
                    s += tl.dot(q_x, tl.trans(k_x), input_precision=PRECISION)
                s = s * qk_scale
            if SOFTCAP:  # s in natural units -> softcap * tanh(s / softcap) in base 2; tanh(x) = 1 - 2 / (e^2x + 1)
                s = cap_log2e * (1.0 - 2.0 / (tl.exp2(s * two_over_cap) + 1.0))
            s = tl.where(live[None, :], s, float("-inf"))
            # Every tile holds at least one live token (start < hi), so m_new is finite and the
            # first tile's rescale factor exp2(-inf - m_new) is 0, wiping the zero-initialised state.
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)  # (R_BLOCK,) how much the old state shrinks
            p = tl.exp2(s - m_new[:, None])  # (R_BLOCK, TILE)
            l = l * alpha + tl.sum(p, 1)
            if V_IS_K:  # MLA: the value is the key's first DV numbers (c_kv), already loaded
                v = k
            else:
                v_rows = block * stride_vblk + (tok % BS) * stride_vslot + kh * stride_vhead
                v = tl.load(v_ptr + v_rows[:, None] + vdims[None, :], mask=live[:, None], other=0.0)  # (TILE, DV)
            if QUANT:  # each value's scale multiplies its softmax weight
                vs = tl.load(vs_ptr + block * stride_vsblk + (tok % BS) * stride_vsslot + kh * stride_vshead,
                             mask=live, other=0.0).to(tl.float32)  # (TILE,)
                acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(q.dtype), v.to(q.dtype),
                                                    input_precision=PRECISION)
            else:
                # p in the cache's dtype for the tensor cores (as FlashAttention does), summed in fp32.
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        o_rows = b * stride_ob + heads[:, None] * stride_oh
        if SPLIT:  # this part's unnormalised (acc, m, l); `merge_splits` combines the parts
            tl.store(out_ptr + o_rows + split * stride_os + vdims[None, :], acc, mask=row_ok[:, None])
            ml = b * stride_mb + heads * stride_mh + split
            tl.store(m_ptr + ml, m, mask=row_ok)
            tl.store(l_ptr + ml, l, mask=row_ok)
        else:
            out = acc / l[:, None]
            tl.store(out_ptr + o_rows + vdims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    return paged_decode_kernel


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           tile: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                           heads_per_program: int | None = None, splits: int | None = 1,
                           max_registers: int | None = None, values_in_keys: bool = False,
                           window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query per sequence against its paged K/V. q: (B, H, dk); k_cache: (num_blocks, bs, K, dk),
    v_cache: (num_blocks, bs, K, dv), each with the last dimension contiguous; block_tables: (B, nb)
    integer, entries past a sequence's last block are never read; context_lens: (B,) integer >= 1, the
    keys each query sees (positions 0 .. ctx-1; in a decode step the new token's own key is the last);
    scale: the softmax scale of the scores, 1/sqrt(dk) if None. Returns (B, H, dv).
    k_scale, v_scale: for int8 or fp8 caches, (num_blocks, bs, K, 1) scales (any float dtype): the
    cache then holds codes, dequantized as code x scale; None for plain caches.
    values_in_keys: v_cache is a view of k_cache's first dv numbers (MLA's latent), so the kernel reads
    each key row once and uses its prefix as the value; see `paged_latent_decode_attention`.
    window: a sliding-window layer's query sees only its last `window` keys (positions ctx - window .. ctx - 1),
    and the walk starts there, so a table's entries before the window are never read; None: all ctx keys.
    softcap: scores become softcap * tanh(score / softcap) before the softmax (Gemma 2's soft-capping).
    Launch settings (inference/benchmarks/paged_decode.py sweeps them): tile keys per loop iteration (64; 128
    for int8 and fp8 codes, 256 for int8 over tables of LONG_CONTEXT keys or more); max_registers per thread (Triton's maxnreg; None: the compiler's choice, but
    CODE_MAX_REGISTERS for codes at the default tile); num_warps (4, or 8 for keys wider than 256 numbers); heads_per_program query heads of
    one KV head per program (all r, at most 64); splits parts per context, FlashDecoding (None: enough to fill the GPU,
    `default_splits`; 1: one program walks the whole context, the output written directly). The defaults
    for MLA's 576-wide rows are the fastest of the 36 settings `--shape deepseek-v3 --sweep` timed on an H100.
    """
    B, H, dk = q.shape
    _, bs, K, _ = k_cache.shape
    dv = v_cache.shape[-1]
    if H % K:
        raise ValueError(f"{H} query heads do not divide into {K} KV heads")
    if k_cache.shape[-1] != dk:
        raise ValueError(f"q has {dk} numbers per head and k_cache {k_cache.shape[-1]}: they must match")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension (head_dim)")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have one row per query, {B}")
    reason = triton_unavailable_reason(q.device, dk, value_dim=dv)
    if reason:
        raise RuntimeError(reason + "; use inference.paged_attention.paged_attention instead")
    D, D_extra = key_split(dk)
    quant = k_scale is not None
    if quant != (v_scale is not None):
        raise ValueError("give both k_scale and v_scale (a quantized cache) or neither (a plain one)")
    if quant and (k_scale.shape != (*k_cache.shape[:3], 1) or v_scale.shape != (*v_cache.shape[:3], 1)):
        raise ValueError(f"scales must be (num_blocks, bs, K, 1), one per token and head; got {tuple(k_scale.shape)} "
                         f"and {tuple(v_scale.shape)} for caches {tuple(k_cache.shape)}")
    if quant and (D_extra or dv != dk):
        raise ValueError("the kernel reads quantized caches whose keys and values are one power-of-2 width")
    if not quant and k_cache.dtype != q.dtype:
        raise ValueError(f"a {k_cache.dtype} cache needs its scales (k_scale, v_scale), or a cache of q's dtype "
                         f"{q.dtype}")
    if values_in_keys and (dv != D or v_cache.data_ptr() != k_cache.data_ptr()):
        raise ValueError(f"values_in_keys: v_cache must be k_cache[..., :{D}] (the key's first power-of-2 part)")
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unused pointers when not quantized
    if block_tables.dtype != torch.int32:  # the engine converts once a step (PagedBatch.kernel_tables)
        block_tables = block_tables.to(torch.int32)
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be >= 1 key, got window={window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    r = H // K
    max_context = block_tables.shape[1] * bs  # a shape: the same for every step a CUDA graph replays
    span = max_context if window is None else min(max_context, window)  # the most keys one query reads
    if quant and tile is None:
        long_int8 = k_cache.dtype == torch.int8 and max_context >= LONG_CONTEXT
        tile = INT8_LONG_TILE_TOKENS if long_int8 else CODE_TILE_TOKENS
        max_registers = max_registers or CODE_MAX_REGISTERS
    tile = tile or TILE_TOKENS
    num_warps = num_warps or (8 if dk > 256 else 4)
    r_block = heads_per_program or min(max(16, 1 << (r - 1).bit_length()), 64)
    r_block = max(16, r_block)  # tl.dot needs at least 16 rows; padding rows are zeros, never stored
    head_blocks = -(-r // r_block)
    splits = default_splits(B, K * head_blocks, span, tile, q.device) if splits is None else splits
    split_len = -(-span // (splits * tile)) * tile  # a multiple of the tile
    splits = -(-span // split_len)
    out, m, l, out_strides, ml_strides = split_outputs(q, splits, dv)
    # Matters for fp32 caches only (the tests' exact-token settings): true fp32 products, not
    # TF32's 10-bit mantissa. bf16 and fp16 operands go to the tensor cores as they are.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _kernel()[(B, K * head_blocks, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, ks, vs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        *out_strides, *ml_strides, ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1),
        vs.stride(2), (1 if softcap else math.log2(math.e)) * (1 / math.sqrt(dk) if scale is None else scale),
        split_len, window or 2**30, math.log2(math.e) * (softcap or 1.0), 2 * math.log2(math.e) / (softcap or 1.0),
        R=r, R_BLOCK=r_block, D=D, D_EXTRA=D_extra, DV=dv, BS=bs, TILE=tile,
        PRECISION=precision, QUANT=quant, V_IS_K=values_in_keys, SPLIT=splits > 1,
        SOFTCAP=softcap is not None,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}))
    return merge_splits(out, m, l, q.dtype) if splits > 1 else out


def paged_latent_decode_attention(q: torch.Tensor, latent_cache: torch.Tensor, value_dim: int,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                                  **launch) -> torch.Tensor:
    """Multi-head latent attention's absorbed decode step over a paged latent cache, read in place.

    q: (B, H, w) absorbed queries [W_UK^T q^C ; q^R]; latent_cache: (num_blocks, bs, w), each row
    [c_kv ; k^R]; every head's key is the whole row and its value the row's first value_dim numbers (c_kv):
    multi-query attention with one KV head, keys w = d_c + d_r wide (576 for DeepSeek-V3) and values
    d_c (512). Returns (B, H, value_dim), each head's output in the latent space (W_UV comes after).
    Splits each context over several programs by default, since one KV head leaves few programs per step."""
    rows = latent_cache[:, :, None, :]  # (num_blocks, bs, 1, w): one KV head
    launch.setdefault("splits", None)
    return paged_decode_attention(q, rows, rows[..., :value_dim], block_tables, context_lens, scale=scale,
                                  values_in_keys=True, **launch)

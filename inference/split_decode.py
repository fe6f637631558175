"""FlashDecoding's split contexts for the decode kernels: how many parts to cut each context into, and their merge.

"Flash-Decoding for long-context inference" (Dao, Haziza, Massa, Sizov, 2023): a decode step has one query per
sequence, so one program per (sequence, KV head) leaves most SMs idle when the batch is small and the contexts
long. Each context is cut into parts, one program each, that leave their unnormalised softmax sums (acc, m, l);
`merge_splits` combines them exactly. Shared by the plain, quantized and latent decode kernel
(inference/triton_paged_attention.py) and the int4 one (inference/triton_kivi_attention.py); checked on a GPU by
tests/inference/test_paged_attention.py.
"""

from __future__ import annotations

import functools

import torch


def merge_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FlashDecoding's merge. Part j of a context left acc_j = sum exp2(s - m_j) v and l_j = sum exp2(s - m_j):
    rescale every part to the common max M = max_j m_j, then out = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j.
    acc: (B, H, splits, dv); m, l: (B, H, splits), contiguous; a part past the context has m = -inf and l = 0,
    weight 0. On a GPU one Triton launch (`_merge_kernel`) does what the torch lines below do in nine kernels,
    in every layer of every decode step (on an H100, 32 x 8k: 128 kernels fewer per step, and a bf16 step's
    GPU time 5.85 -> 5.58 ms)."""
    if acc.is_cuda:
        B, H, S, dv = acc.shape
        out = torch.empty(B, H, dv, dtype=dtype, device=acc.device)
        _merge_kernel()[(B * H,)](acc, m, l, out, S, DV=dv, S_PAD=max(2, 1 << (S - 1).bit_length()))
        return out
    w = torch.exp2(m - m.amax(-1, keepdim=True))  # (B, H, splits); part 0 always holds keys, so M is finite
    return ((w[..., None] * acc).sum(2) / (w * l).sum(-1, keepdim=True)).to(dtype)  # (B, H, dv)


@functools.cache
def _merge_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, S, DV: tl.constexpr, S_PAD: tl.constexpr):
        row = tl.program_id(0)  # one (sequence, query head): its S parts, merged
        parts = tl.arange(0, S_PAD)
        ok = parts < S
        m = tl.load(m_ptr + row * S + parts, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + row * S + parts, mask=ok, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))  # (S_PAD,): 0 for padding and for parts past the context
        dims = tl.arange(0, DV)
        acc = tl.load(acc_ptr + (row * S + parts)[:, None] * DV + dims[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
        tl.store(out_ptr + row * DV + dims, out.to(out_ptr.dtype.element_ty))

    return merge_kernel


def split_outputs(q: torch.Tensor, splits: int, dv: int):
    """What a decode kernel writes for queries q (B, H, .): with splits > 1, each part's fp32 (acc, m, l),
    (B, H, splits, dv) and (B, H, splits) twice, merged afterwards by `merge_splits`; with one part, the
    output (B, H, dv) in q's dtype (m and l unused). Returns (out, m, l, out strides, m and l strides)."""
    B, H = q.shape[:2]
    if splits > 1:
        out = torch.empty(B, H, splits, dv, dtype=torch.float32, device=q.device)
        m = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        return out, m, l, (out.stride(0), out.stride(1), out.stride(2)), (m.stride(0), m.stride(1))
    out = torch.empty(B, H, dv, dtype=q.dtype, device=q.device)
    return out, out, out, (out.stride(0), out.stride(1), 0), (0, 0)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(batch: int, programs_per_seq: int, max_context: int, tile: int, device) -> int:
    """How many parts to cut each context into: enough for about two programs per SM (a program walks its
    tiles one after another, so more programs keep more loads in flight), each part at least 16 tiles,
    since the merge costs launches that short contexts do not repay (on an H100, 2 parts of contexts under
    640 tokens took 46 us against 30 us whole, when the merge was nine torch kernels). Decided from shapes only (no host
    synchronisation), so a CUDA graph captures one launch shape."""
    sms = _multiprocessors(torch.device(device))
    wanted = -(-2 * sms // (batch * programs_per_seq))
    return max(1, min(wanted, max_context // (16 * tile)))

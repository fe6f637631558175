"""Attention over a paged KV cache: a plain reference and a batched gather for any step on any device.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180). `paged_attention_reference` is the oracle:
one sequence at a time, one token slot at a time through the block table, softmax written out
in fp32. `paged_attention` is the one the engine runs for prefills and mixed steps, and on a
CPU for every step (decode steps on a GPU run inference/triton_paged_attention.py instead);
tests/inference/test_paged_attention.py checks both against the reference (fp32 on the CPU;
bf16 on a GPU, where the test runs only if CUDA is present).

Symbols: N query tokens in the step (all sequences packed), B sequences, H query heads,
K key/value heads, r = H/K queries per KV head (GQA), d head_dim, bs block_size,
nb blocks per sequence (the longest table, padded), S = nb*bs key slots per sequence.

Layout of one layer's cache: (num_blocks, bs, K, d). Sequence b's query number t (0-based
among its q_len[b] new tokens) sits at position ctx[b] - q_len[b] + t and attends to positions
0 .. that position of its own sequence: causal attention, one sequence at a time. A sliding-window
layer's query at position p sees only p - window + 1 .. p, and a soft-capped layer's scores pass through
softcap * tanh(score / softcap) before the softmax (`KVSpec` in architectures/common/cache.py).
"""

from __future__ import annotations

import math

import torch

from architectures.common.attention import grouped_attention


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: list[list[int]], context_lens: list[int],
                              query_lens: list[int], scale: float | None = None, window: int | None = None,
                              softcap: float | None = None) -> torch.Tensor:
    """q: (N, H, d) packed queries; caches: (num_blocks, bs, K, d) -> (N, H, d); scale 1/sqrt(d) if None;
    window: each query at position p sees positions p - window + 1 .. p (None: 0 .. p); softcap: scores become
    softcap * tanh(score / softcap) before the softmax (None: plain scores).

    Written to be obviously right, not fast: Python loops over sequences and token slots. Only the
    positions some query sees are read, so a windowed table's entries before its window are never touched.
    """
    bs, K, H, d = k_cache.shape[1], k_cache.shape[2], q.shape[1], q.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    first = 0  # index in q of this sequence's first query
    for table, ctx, n in zip(block_tables, context_lens, query_lens):
        lo = 0 if window is None else max(0, ctx - n - window + 1)  # the first position any query here sees
        # Walk the block table: logical position p is slot p % bs of physical block table[p // bs].
        keys = torch.stack([k_cache[table[p // bs], p % bs] for p in range(lo, ctx)]).float()  # (S, K, d)
        values = torch.stack([v_cache[table[p // bs], p % bs] for p in range(lo, ctx)]).float()  # (S, K, d)
        keys = keys.repeat_interleave(H // K, dim=1)  # (S, H, d): query head h reads KV head h // r
        values = values.repeat_interleave(H // K, dim=1)
        for t in range(n):
            pos = ctx - n + t
            seen = slice(0 if window is None else max(0, pos - window + 1) - lo, pos + 1 - lo)
            scores = torch.einsum("hd,shd->hs", q[first + t].float(), keys[seen]) * scale  # (H, keys seen)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            out[first + t] = torch.einsum("hs,shd->hd", scores.softmax(-1), values[seen]).to(q.dtype)
        first += n
    return out


def attention_mask(q_pos: torch.Tensor, num_slots: int, window: int | None = None) -> torch.Tensor:
    """(B, Tmax) query positions -> (B, Tmax, S) bool: key slot j of a sequence is visible iff j <= pos
    (and, for a sliding window, j > pos - window).

    Padding queries are given position 0, so they see slot 0 only: never an all-masked row, whose
    softmax would be NaN.
    """
    j = torch.arange(num_slots, device=q_pos.device)[None, None, :]
    pos = q_pos[:, :, None]
    return (j <= pos) if window is None else (j <= pos) & (j > pos - window)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """One layer's stored tensor (num_blocks, bs, *shape) -> (B, nb * bs, *shape): each sequence's
    blocks in logical order, padded to the longest table. The gather moves whole contiguous blocks."""
    B, nb = block_tables.shape
    return cache[block_tables].view(B, nb * cache.shape[1], *cache.shape[2:])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    q_index: torch.Tensor, out_index: torch.Tensor, mask: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """Batched paged attention: gather each sequence's blocks into a padded batch, one SDPA call.

    q: (N, H, d); caches: (num_blocks, bs, K, d); block_tables: (B, nb) with unused entries
    pointing at any valid block; q_index: (B, Tmax) index in q of sequence b's t-th query (any
    valid index for padding); out_index: (N,) row of the padded output (b * Tmax + t) that each
    query's result lands in; mask: (B, Tmax, S), boolean from `attention_mask` or its additive
    float form (0 / -inf); scale: 1/sqrt(d) if None. Returns (N, H, d).

    No Python loop over sequences or a host synchronisation, so one call serves a whole decode
    batch and can be captured in a CUDA graph. The price is reading every table padded to the
    longest one. The engine runs the same three pieces through `PagedBatch.read` and the layer's
    own `attend_kv`; this function composes them for tests and the kernel benchmark.
    """
    B, Tmax = q_index.shape
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = grouped_attention(q[q_index], gather_blocks(k_cache, block_tables), gather_blocks(v_cache, block_tables),
                            mask, scale)  # (B, Tmax, H, d)
    return out.reshape(B * Tmax, *out.shape[2:])[out_index]  # (N, H, d)

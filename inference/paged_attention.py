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
0 .. that position of its own sequence: causal attention, one sequence at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: list[list[int]], context_lens: list[int],
                              query_lens: list[int]) -> torch.Tensor:
    """q: (N, H, d) packed queries; caches: (num_blocks, bs, K, d) -> (N, H, d).

    Written to be obviously right, not fast: Python loops over sequences and token slots.
    """
    bs, K, H, d = k_cache.shape[1], k_cache.shape[2], q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    first = 0  # index in q of this sequence's first query
    for table, ctx, n in zip(block_tables, context_lens, query_lens):
        # Walk the block table: logical position p is slot p % bs of physical block table[p // bs].
        keys = torch.stack([k_cache[table[p // bs], p % bs] for p in range(ctx)]).float()  # (S, K, d)
        values = torch.stack([v_cache[table[p // bs], p % bs] for p in range(ctx)]).float()  # (S, K, d)
        keys = keys.repeat_interleave(H // K, dim=1)  # (S, H, d): query head h reads KV head h // r
        values = values.repeat_interleave(H // K, dim=1)
        for t in range(n):
            pos = ctx - n + t
            scores = torch.einsum("hd,shd->hs", q[first + t].float(), keys[:pos + 1]) / math.sqrt(d)  # (H, pos+1)
            out[first + t] = torch.einsum("hs,shd->hd", scores.softmax(-1), values[:pos + 1]).to(q.dtype)
        first += n
    return out


def attention_mask(q_pos: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, Tmax) query positions -> (B, Tmax, S) bool: key slot j of a sequence is visible iff j <= pos.

    Padding queries are given position 0, so they see slot 0 only: never an all-masked row, whose
    softmax would be NaN.
    """
    j = torch.arange(num_slots, device=q_pos.device)
    return j[None, None, :] <= q_pos[:, :, None]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    q_index: torch.Tensor, out_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched paged attention: gather each sequence's blocks into a padded batch, one SDPA call.

    q: (N, H, d); caches: (num_blocks, bs, K, d); block_tables: (B, nb) with unused entries
    pointing at any valid block; q_index: (B, Tmax) index in q of sequence b's t-th query (any
    valid index for padding); out_index: (N,) row of the padded output (b * Tmax + t) that each
    query's result lands in; mask: (B, Tmax, S), boolean from `attention_mask` or its additive
    float form (0 / -inf). Returns (N, H, d).

    No Python loop over sequences or a host synchronisation, so one call serves a whole decode
    batch and can be captured in a CUDA graph. The price is reading every table padded to the
    longest one; the block gather moves whole contiguous blocks.
    """
    B, Tmax = q_index.shape
    nb, (_, bs, K, d) = block_tables.shape[1], k_cache.shape
    H = q.shape[1]
    r = H // K
    keys = k_cache[block_tables].view(B, nb * bs, K, d).transpose(1, 2)  # (B, K, S, d)
    values = v_cache[block_tables].view(B, nb * bs, K, d).transpose(1, 2)  # (B, K, S, d)
    # GQA without copying K/V per query head: the r query heads that share a KV head become r
    # extra query rows of that head, so SDPA sees K heads with Tmax * r queries each.
    qg = q[q_index].view(B, Tmax, K, r, d).permute(0, 2, 1, 3, 4).reshape(B, K, Tmax * r, d)
    if Tmax == 1:
        m = mask[:, None]  # (B, 1, 1, S), broadcast over heads and over the r rows
    else:
        m = mask[:, None, :, None, :].expand(B, 1, Tmax, r, mask.shape[-1]).reshape(B, 1, Tmax * r, -1)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=m)  # (B, K, Tmax * r, d)
    out = out.view(B, K, Tmax, r, d).permute(0, 2, 1, 3, 4).reshape(B * Tmax, H, d)  # (B * Tmax, H, d)
    return out[out_index]  # (N, H, d)

"""Softmax attention over keys and values, with and without a cache: the math every attention layer shares.

Attention(q, K, V) = softmax(q K^T * scale + mask) V, with K <= H key/value heads (grouped-query
attention, "GQA", arXiv:2305.13245): each group of r = H/K query heads reads one K/V head.
The scale is the layer's own (1/sqrt(d) for Llama; DeepSeek's multi-head latent attention
multiplies in YaRN's mscale), so every function here takes it as an argument.

Symbols: B sequences, T queries per sequence, S keys, H query heads, K KV heads, d head dim
(of q and k), dv head dim of v, r = H/K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.common.cache import Cache


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """No cache: every query t sees keys 0..t. q: (B, H, T, d); k: (B, K, T, d); v: (B, K, T, dv) -> (B, H, T, dv).

    SDPA dispatches to a flash kernel on GPUs; enable_gqa lets each group of H/K query heads read
    one K/V head without a copy."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=True)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """Attention over stored keys. q: (B, T, H, d); k: (B, S, K, d); v: (B, S, K, dv);
    mask: (B, T, S) or (T, S), bool (True = visible) or additive float, or None (all visible)
    -> (B, T, H, dv).

    GQA without copying K/V per query head: the r query heads that share a KV head become r
    extra query rows of that head, so SDPA sees K heads with T * r queries each.
    """
    B, T, H, d = q.shape
    S, K, dv = k.shape[1], k.shape[2], v.shape[-1]
    r = H // K
    qg = q.reshape(B, T, K, r, d).permute(0, 2, 1, 3, 4).reshape(B, K, T * r, d)  # (B, K, T*r, d)
    m = None
    if mask is not None:
        mask = mask if mask.dim() == 3 else mask[None]  # (B or 1, T, S)
        if T == 1:
            m = mask[:, None]  # (B, 1, 1, S), broadcast over heads and over the r rows
        else:
            m = mask[:, None, :, None, :].expand(mask.shape[0], 1, T, r, S).reshape(mask.shape[0], 1, T * r, S)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, scale=scale)
    return out.view(B, K, T, r, dv).permute(0, 2, 1, 3, 4).reshape(B, T, H, dv)  # (B, T, H, dv)


def attend_kv(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Cache,
              scale: float) -> torch.Tensor:
    """Store this step's K/V in the cache, then attend over everything the cache holds for the queries.

    q: (B, T, H, d); k: (B, T, K, d); v: (B, T, K, dv), in the model's layout -> (B, T, H, dv).
    The cache decides where K/V live and which slots each query may see; the math is here."""
    cache.write(layer, k=k, v=v)
    view = cache.read(layer)
    if view.kernel is not None:  # a fused kernel that reads K/V where they are stored
        return view.kernel(q, scale)
    out = grouped_attention(view.pack(q), view.tensors["k"], view.tensors["v"], view.mask, scale)
    return view.unpack(out)

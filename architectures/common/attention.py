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


def sliding_window_mask(T: int, window: int | None, device=None) -> torch.Tensor:
    """(T, T) bool, True = visible: query i sees keys i - window < j <= i (all j <= i when window is None)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    mask = j <= i
    return mask if window is None else mask & (j > i - window)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     dropout_p: float = 0.0, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """No cache: every query t sees keys 0..t (the last `window` of them for a sliding-window layer).
    q: (B, H, T, d); k: (B, K, T, d); v: (B, K, T, dv) -> (B, H, T, dv).

    SDPA dispatches to a flash kernel on GPUs; enable_gqa lets each group of H/K query heads read
    one K/V head without a copy. A window becomes an explicit mask; soft-capped scores take the
    explicit path (`softcapped_attention`), since SDPA has no hook between the scores and the softmax."""
    T = q.shape[2]
    if softcap is not None:
        return softcapped_attention(q, k, v, sliding_window_mask(T, window, q.device), scale, softcap, dropout_p)
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(T, window, q.device),
                                          dropout_p=dropout_p, scale=scale, enable_gqa=True)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, softcap: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap) + mask) v, written out (Gemma 2's attention-logit soft-capping).

    q: (B, H, T, d); k: (B, K, S, d); v: (B, K, S, dv); mask: (T, S) or (B, 1, T, S) bool (True =
    visible) or additive float, or None -> (B, H, T, dv). tanh squashes every score into (-cap, cap),
    so no single logit can dominate the softmax however large q and k grow; the softmax runs in fp32."""
    B, H, T, d = q.shape
    K, S = k.shape[1], k.shape[2]
    r = H // K
    qg = q.reshape(B, K, r * T, d)  # the r query heads of a group read one K/V head: (B, K, r*T, d)
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # (B, K, r*T, S)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(B, K, r, T, S)
    if mask is not None:
        m = mask if mask.dim() == 2 else mask.view(mask.shape[0], 1, 1, T, S)  # broadcast over heads
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = F.dropout(scores.softmax(-1), p=dropout_p) if dropout_p else scores.softmax(-1)
    out = probs.to(v.dtype).view(B, K, r * T, S) @ v  # (B, K, r*T, dv)
    return out.view(B, H, T, -1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention over stored keys. q: (B, T, H, d); k: (B, S, K, d); v: (B, S, K, dv);
    mask: (B, T, S) or (T, S), bool (True = visible) or additive float, or None (all visible)
    -> (B, T, H, dv).

    GQA without copying K/V per query head: the r query heads that share a KV head become r
    extra query rows of that head, so SDPA sees K heads with T * r queries each. With a soft-cap the
    same scores go through `softcapped_attention` instead of SDPA.
    """
    if softcap is not None:
        qh = q.transpose(1, 2)  # (B, H, T, d)
        m = None if mask is None else (mask if mask.dim() == 2 else mask[:, None])  # (T, S) or (B, 1, T, S)
        return softcapped_attention(qh, k.transpose(1, 2), v.transpose(1, 2), m, scale, softcap).transpose(1, 2)
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
              scale: float, softcap: float | None = None) -> torch.Tensor:
    """Store this step's K/V in the cache, then attend over everything the cache holds for the queries.

    q: (B, T, H, d); k: (B, T, K, d); v: (B, T, K, dv), in the model's layout -> (B, T, H, dv).
    The cache decides where K/V live and which slots each query may see (a sliding-window layer's
    window included, from its `KVSpec`); the math, soft-capping included, is here."""
    cache.write(layer, k=k, v=v)
    view = cache.read(layer)
    if view.kernel is not None:  # a fused kernel that reads K/V where they are stored
        return view.kernel(q, scale)
    out = grouped_attention(view.pack(q), view.tensors["k"], view.tensors["v"], view.mask, scale, softcap)
    return view.unpack(out)

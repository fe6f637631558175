"""Attention from scratch, read beside notes/attention.md: a soft lookup, scaled dot-product
attention, the causal and sliding-window masks, multi-head attention, and a pre-norm residual block.

Plain PyTorch tensors and nn.Linear, no fused kernels: each function is the formula of the note
line by line. tests/fundamentals/test_attention.py checks them against
torch.nn.functional.scaled_dot_product_attention, torch.nn.MultiheadAttention and the zoo's
`causal_attention` (architectures/common/attention.py), which every model of the zoo calls.

Shapes: B batch, T positions (queries), S positions (keys), H heads, d width of a head, D = H * d.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def soft_lookup(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A dictionary read by similarity: every value, weighted by how well its key matches the query.

    query: (d,); keys: (S, d); values: (S, dv) -> (dv,). A Python dict returns the value of the one
    key equal to the query; here each key scores q . k, softmax turns the scores into weights that
    are positive and sum to 1, and the answer is the weighted mean of the values. When one score is
    far above the others its weight is ~1, and the read is the dict's.
    """
    scores = keys @ query  # (S,): one similarity per key
    weights = torch.softmax(scores, dim=0)  # (S,), sums to 1
    return weights @ values  # (dv,)


def causal_mask(T: int) -> torch.Tensor:
    """(T, T) bool, True where query t may see key s: s <= t (a token never sees the future)."""
    return torch.ones(T, T, dtype=torch.bool).tril()


def sliding_window_mask(T: int, window: int) -> torch.Tensor:
    """(T, T) bool: causal, and only the last `window` keys, t - window < s <= t (Mistral, Gemma 2)."""
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    return (s <= t) & (s > t - window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              return_weights: bool = False):
    """softmax(q k^T / sqrt(d) + mask) v, batched over any leading dimensions.

    q: (..., T, d); k: (..., S, d); v: (..., S, dv); mask: (T, S) bool, True = visible, or None
    -> (..., T, dv), and the (..., T, S) weights if `return_weights`.
    """
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., T, S): each query against each key
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: a hidden key gets no weight
    weights = torch.softmax(scores, dim=-1)  # (..., T, S), each row sums to 1
    out = weights @ v  # (..., T, dv): each query's weighted mean of the values
    return (out, weights) if return_weights else out


class MultiHeadAttention(nn.Module):
    """H attentions side by side, each in its own d = D / H dimensions, then mixed by one matrix.

    x: (B, T, D) -> (B, T, D). Projections without bias, as in Llama; `causal` masks the future.
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}: each head takes dim / num_heads")
        self.num_heads, self.head_dim, self.causal = num_heads, dim // num_heads, causal
        self.q_proj = nn.Linear(dim, dim, bias=False)  # W_Q: (D, D), all heads' queries at once
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)  # W_O: mixes what the heads found

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, d): head h owns columns h*d .. (h+1)*d of the projection."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, H, T, d)
        k = self.split_heads(self.k_proj(x))  # (B, H, T, d)
        v = self.split_heads(self.v_proj(x))  # (B, H, T, d)
        mask = causal_mask(T).to(x.device) if self.causal else None
        heads = attention(q, k, v, mask)  # (B, H, T, d): each head attends on its own
        merged = heads.transpose(1, 2).reshape(B, T, D)  # (B, T, H*d): the heads side by side
        return self.o_proj(merged)  # (B, T, D)


class Block(nn.Module):
    """One pre-norm transformer block: x + attention(norm(x)), then + mlp(norm(x)).

    x: (B, T, D) -> (B, T, D). The residual stream x is never normalised itself: each sublayer reads
    a normalised copy and adds its output back, so a block starts close to the identity and the
    gradient reaches early layers through the additions unchanged.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * dim
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, causal=True)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # tokens exchange information
        return x + self.mlp(self.mlp_norm(x))  # each token is transformed on its own

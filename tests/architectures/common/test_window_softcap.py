"""Sliding-window attention and soft-capped scores (architectures/common/attention.py), and the naive cache's
per-window masks, against a loop over queries written out one score at a time."""

import math

import pytest
import torch

from architectures.common.attention import attend_kv, causal_attention, grouped_attention
from architectures.common.cache import KVSpec
from inference.kv_cache import NaiveKVCache


def slow_attention(q, k, v, scale, window=None, softcap=None):
    """q: (B, H, T, d); k, v: (B, K, T, d). Query t of head h reads KV head h // (H/K) at positions
    max(0, t - window + 1) .. t, one softmax per query."""
    B, H, T, d = q.shape
    r = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                lo = 0 if window is None else max(0, t - window + 1)
                s = [float(q[b, h, t] @ k[b, h // r, j]) * scale for j in range(lo, t + 1)]
                if softcap is not None:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                p = torch.tensor(s, dtype=torch.float64).softmax(0)
                out[b, h, t] = p @ v[b, h // r, lo:t + 1].double()
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 5.0), (4, 2.0), (100, None)])
def test_causal_attention_with_window_and_softcap_equals_the_loop(window, softcap):
    g = torch.Generator().manual_seed(0)
    B, H, K, T, d = 2, 4, 2, 9, 8
    q, k, v = (torch.randn(B, n, T, d, generator=g) * 2 for n in (H, K, K))
    got = causal_attention(q, k, v, 0.5, window=window, softcap=softcap)
    torch.testing.assert_close(got.double(), slow_attention(q, k, v, 0.5, window, softcap), atol=1e-5, rtol=1e-5)


def test_grouped_attention_softcap_equals_causal_attention():
    g = torch.Generator().manual_seed(1)
    B, H, K, T, d = 2, 6, 3, 7, 4
    q, k, v = (torch.randn(B, T, n, d, generator=g) * 3 for n in (H, K, K))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    got = grouped_attention(q, k, v, mask, 0.7, softcap=1.5)
    want = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.7, softcap=1.5)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [[0, 0], [0, 3]])
def test_naive_cache_applies_each_layers_own_window(pad):
    """Two layers, one windowed and one global, fed a prompt then one token at a time: every step's output
    equals attention over the whole sequence so far with that layer's window (padding rows left out)."""
    g = torch.Generator().manual_seed(2)
    B, H, K, d, T, window = 2, 2, 1, 4, 12, 3
    specs = [KVSpec(K, d, window=window), KVSpec(K, d)]
    cache = NaiveKVCache(specs, B, T + max(pad), pad=pad)
    q, k, v = (torch.randn(B, T + max(pad), n, d, generator=g) for n in (H, K, K))
    steps = [max(pad) + 5] + [1] * (T - 5)
    start = 0
    for n in steps:
        cache.positions(B, n, "cpu")
        outs = [attend_kv(layer, q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], cache, 0.5)
                for layer in range(2)]
        cache.advance(n)
        start += n
        for layer, w in enumerate([window, None]):
            for b in range(B):
                p = pad[b]
                want = slow_attention(q[b:b + 1, p:start].transpose(1, 2), k[b:b + 1, p:start].transpose(1, 2),
                                      v[b:b + 1, p:start].transpose(1, 2), 0.5, w)[0].transpose(0, 1)
                torch.testing.assert_close(outs[layer][b, -1].double(), want[-1], atol=1e-5, rtol=1e-5)


def test_bad_window_and_softcap_are_refused():
    with pytest.raises(ValueError, match="window"):
        KVSpec(1, 4, window=0)
    with pytest.raises(ValueError, match="softcap"):
        KVSpec(1, 4, softcap=-1.0)

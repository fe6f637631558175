"""A Llama 3 whose layers attend over sliding windows, some with soft-capped scores: the model the sliding-window
benchmark runs (python -m inference.benchmarks.sliding_window) and tests/inference/test_sliding_window.py checks.

Layer i attends over `windows[i % len(windows)]` tokens (None: every earlier token), so (512, 512, 512, 512,
512, None) is Gemma 3's pattern of five local layers to one global one; `softcap` soft-caps every layer's
scores (Gemma 2's softcap * tanh(score / softcap)). Each layer declares both in its `KVSpec`, which is what
the caches read; without a cache it passes them to `causal_attention`, with one to `attend_kv`, exactly as a
family with windows does. Everything else (RoPE, GQA, SwiGLU, the weights' names) is Llama 3's, so the
model is a stand-in with Gemma 3's cache layout, not Gemma 3: random weights for the engine's checks and
timings.
"""

from __future__ import annotations

from architectures.common.attention import attend_kv, causal_attention
from architectures.common.cache import KVSpec
from architectures.llama3.config import LlamaConfig
from architectures.llama3.model import Attention, Llama3, apply_rope

GEMMA3_PATTERN = (512, 512, 512, 512, 512, None)  # Gemma 3: five local layers of 512 tokens, then a global one


class WindowedAttention(Attention):
    """Llama 3's attention over the last `window` tokens (None: all), its scores soft-capped by `softcap`."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int, window: int | None, softcap: float | None):
        super().__init__(cfg, layer_idx)
        self.window, self.softcap = window, softcap

    def cache_spec(self) -> KVSpec:
        return KVSpec(self.n_kv_heads, self.head_dim, window=self.window, softcap=self.softcap)

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, d)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, K, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, d)
        if cache is None:
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                                   window=self.window, softcap=self.softcap).transpose(1, 2)  # (B, T, H, d)
        else:
            out = attend_kv(self.layer_idx, q, k, v, cache, self.scale, softcap=self.softcap)  # (B, T, H, d)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


class WindowedLlama(Llama3):
    """Llama 3 with layer i attending over windows[i % len(windows)] tokens, every score soft-capped by softcap."""

    def __init__(self, cfg: LlamaConfig, windows: tuple = GEMMA3_PATTERN, softcap: float | None = None):
        if not windows:
            raise ValueError("give at least one window (None for a global layer)")
        self.windows, self.softcap = tuple(windows), softcap  # set before the stack is built: make_mixer reads them
        super().__init__(cfg)

    def make_mixer(self, cfg: LlamaConfig, layer_idx: int) -> WindowedAttention:
        return WindowedAttention(cfg, layer_idx, self.windows[layer_idx % len(self.windows)], self.softcap)


def gemma3_1b_like(**overrides) -> LlamaConfig:
    """Gemma 3 1B's attention shape on Llama 3's blocks: 26 layers, hidden 1152, 4 query heads sharing one KV head
    of 256, a 6,912-wide feed-forward, 262,144 positions of RoPE, Gemma 3's vocabulary of 262,144."""
    base = dict(vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768,
                rope_theta=1_000_000.0, tie_word_embeddings=True)
    return LlamaConfig(**{**base, **overrides})

"""What each layer keeps while generating, declared by the layer, and the contract of a cache.

Caches are sized and laid out from declarations, never from one architecture's config fields
(the idea of vLLM v1's per-layer KV cache specs). A layer's `cache_spec()` returns one of:

- `KVSpec`: full attention keeps a key and a value per token and KV head (Llama 3, Mixtral);
- `LatentSpec`: a single vector per token from which keys and values are recomputed (DeepSeek's
  multi-head latent attention caches its compressed c_kv and the shared RoPE key, one row);
- `StateSpec`: a fixed-size state per sequence, whatever its length (a Mamba-2 layer's
  convolution window and SSM state);
- None: the layer keeps nothing (a feed-forward-only layer).

A spec names the tensors it stores per token (`per_token`) and per sequence (`per_sequence`),
with their shapes; the naive cache, the paged pool, `bytes_per_block` and `inference/memory.py`
all size themselves from those names and shapes, and the engine picks its attention kernel from
them. The cache stores and indexes: `write` puts this step's tensors in their slots, `read`
returns what a layer's queries may look at (a `CacheView`). The math, softmax scale included,
stays with the layer that owns it (`attend_kv` in architectures/common/attention.py for K/V).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Union

import torch


@dataclass(frozen=True)
class KVSpec:
    """Attention over stored keys: per token, K of (num_kv_heads, head_dim) and V of (num_kv_heads, v_head_dim).

    window: a sliding-window layer's query at position p sees only the keys at positions
    p - window + 1 .. p (the last `window` tokens, itself included), so a cache may drop older ones;
    None: full causal attention. softcap: the layer passes its scores through
    softcap * tanh(score / softcap) before the softmax (Gemma 2); declared here because both decide
    which kernels can read the layer's cache and how much of it must be kept."""
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None  # None: the same as head_dim
    window: int | None = None  # sliding window in tokens, itself included; None: full causal attention
    softcap: float | None = None  # attention-logit soft-capping; None: plain scores

    def __post_init__(self):
        if self.window is not None and self.window <= 0:
            raise ValueError(f"a sliding window must be a positive number of tokens, got window={self.window}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"an attention soft-cap must be positive, got softcap={self.softcap}")

    @property
    def per_token(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.num_kv_heads, self.head_dim),
                "v": (self.num_kv_heads, self.v_head_dim or self.head_dim)}

    @property
    def per_sequence(self) -> dict[str, tuple[int, ...]]:
        return {}


@dataclass(frozen=True)
class LatentSpec:
    """One latent vector of `width` numbers per token, shared by every head."""
    width: int
    # The row's first value_width numbers are every head's value and the whole row its key (MLA's absorbed
    # form: [c_kv ; k^R] and c_kv), so a decode kernel can attend over the latent directly; None: not so.
    value_width: int | None = None

    @property
    def per_token(self) -> dict[str, tuple[int, ...]]:
        return {"latent": (self.width,)}

    @property
    def per_sequence(self) -> dict[str, tuple[int, ...]]:
        return {}


@dataclass(frozen=True)
class StateSpec:
    """A fixed-size state per sequence: {name: shape}, nothing per token."""
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def per_token(self) -> dict[str, tuple[int, ...]]:
        return {}

    @property
    def per_sequence(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)


CacheSpec = Union[KVSpec, LatentSpec, StateSpec]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bytes_per_token(specs: list[CacheSpec | None], dtype_bytes: int) -> int:
    """Bytes every cached token costs, summed over layers. For Llama 3: 2 x layers x K x d x bytes."""
    return sum(_numel(shape) for s in specs if s is not None for shape in s.per_token.values()) * dtype_bytes


def bytes_per_sequence(specs: list[CacheSpec | None], dtype_bytes: int) -> int:
    """Bytes of fixed-size state every sequence costs, summed over layers (0 for attention-only models)."""
    return sum(_numel(shape) for s in specs if s is not None for shape in s.per_sequence.values()) * dtype_bytes


@dataclass
class CacheView:
    """What the queries of one layer may look at, in the layout the attention math wants.

    tensors: each stored per-token tensor, (Bq, S, *shape): row b holds the S slots sequence b's
        queries may attend to (padded; the mask hides the padding).
    mask: (Bq, Tq, S) or (Tq, S), bool (True = visible) or additive float (0 / -inf); None when
        every query sees all S slots.
    pack / unpack: move tensors between the model's layout (B, T, ...) and the (Bq, Tq, ...)
        layout of the view (the identity for the naive cache; the paged engine packs all its
        sequences into one row and unpacks them here).
    kernel: set instead of the rest when the stored tensors are read where they lie by a fused
        kernel (the paged engine's decode kernel): kernel(q, scale) -> output, in the model's layout.
    """
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    pack: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    unpack: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    kernel: Callable[[torch.Tensor, float], torch.Tensor] | None = None


class Cache(Protocol):
    """The calls a model makes on an inference cache (`NaiveKVCache`, the paged engine's `PagedBatch`).

    positions(B, T, device) -> (B, T) absolute position of each incoming token
    max_length()            -> tokens already stored for the longest sequence, or None for a
                               cache that packs several sequences into one row and checks
                               their lengths itself
    write(layer, **new)     -> store this step's per-token tensors of `layer`, each (B, T, *shape),
                               named as the layer's spec names them (k=..., v=... for a KVSpec)
    read(layer)             -> a CacheView of everything the step's queries may attend to
    state(layer)            -> {name: (B, *shape)} per-sequence state of a StateSpec layer, updated in place
    advance(T)              -> called by the model after its last layer
    """

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor: ...

    def max_length(self) -> int | None: ...

    def write(self, layer: int, **new: torch.Tensor) -> None: ...

    def read(self, layer: int) -> CacheView: ...

    def state(self, layer: int) -> dict[str, torch.Tensor]: ...

    def advance(self, seq_len: int) -> None: ...

"""Rotary position embeddings (RoPE) and the ways the zoo sets their frequencies.

RoPE rotates each pair of channels of q and k by an angle position * theta_i, so that q.k depends
on positions only through their difference. "RoFormer" (Su et al., 2021, arXiv:2104.09864).
The frequencies theta_i, side by side (notes/long-context.md compares them on a trained model):

- default:  theta_i = base^(-2i/d), i < d/2: wavelengths 2*pi/theta_i from 2*pi to about 2*pi*base.
- position interpolation ("Extending Context Window of Large Language Models via Positional
  Interpolation", Chen et al., 2023, arXiv:2306.15595; transformers' rope_type "linear"): every
  theta_i divided by `factor`, so position p turns as position p / factor did.
- NTK-aware scaling (proposed on Reddit by bloc97, 2023; section 3.1 of the YaRN paper below):
  the base multiplied by factor^(d/(d-2)): theta_0 stays, the lowest frequency is divided by
  exactly `factor`, and the ones in between by a geometric progression of factors.
- Llama 3.1 ("The Llama 3 Herd of Models", 2024, arXiv:2407.21783): keep the high frequencies,
  divide the low ones by `factor`, interpolate smoothly in between (by wavelength).
- YaRN ("YaRN: Efficient Context Window Extension of Large Language Models", Peng et al., 2023,
  arXiv:2309.00071; DeepSeek-V3 and Kimi K2 use it): the same idea with the boundaries set by
  how many full rotations a dimension makes over the original context (beta_fast, beta_slow),
  plus a change of attention temperature: cos/sin are multiplied by `attention_factor`, and
  DeepSeek's attention multiplies its softmax scale by mscale(factor, mscale_all_dim)^2.

Tested against transformers' `_compute_default_rope_parameters`, `_compute_llama3_parameters`
and `_compute_yarn_parameters` (tests/architectures/deepseek_v3/test_rope.py), its
`_compute_linear_scaling_rope_parameters` and `_compute_dynamic_ntk_parameters` (at the sequence
length where its dynamic factor equals ours; tests/architectures/common/test_rope_scaling.py),
and through the Llama 3 and DeepSeek-V3 logit tests.

Symbols: d rotary dimension (even), i < d/2 the pair index, L the original context length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The rope_scaling keys each scaling needs (transformers' required keys, rope_type aside).
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
YARN_KEYS = ("factor", "original_max_position_embeddings")


def read_hf_rope(d: dict, supported: tuple[str, ...], where: str, family: str) -> tuple[float, str, dict]:
    """(theta, rope type, the scaling's other keys) of a Hugging Face config.json dict.

    transformers 5 writes `rope_parameters` (theta inside), v4 `rope_theta` beside a `rope_scaling`
    dict whose type is `rope_type` or the older `type`; both are read. A type this family does not
    compute is an error: loading would silently change the function."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind not in supported:
        raise ValueError(f"{where}: rope type {kind!r} is not supported; {family} uses "
                         f"{' or '.join(repr(k) for k in supported)}")
    return float(theta), kind, rope


def default_inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d), i < d/2 -> (d/2,) fp32."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def linear_inverse_frequencies(dim: int, base: float, factor: float) -> torch.Tensor:
    """Position interpolation: theta_i / factor for every i, (d/2,) fp32. A context `factor`
    times the trained one then turns through the angles the model was trained on; the price is
    that neighbouring positions are `factor` times closer in angle in every dimension."""
    return default_inverse_frequencies(dim, base) / factor


def ntk_inverse_frequencies(dim: int, base: float, factor: float) -> torch.Tensor:
    """NTK-aware scaling: base' = base * factor^(d/(d-2)), so theta_i' = theta_i * factor^(-2i/(d-2)),
    (d/2,) fp32. The fastest pair (i = 0) keeps its frequency, the slowest (i = d/2 - 1) is divided
    by exactly `factor`: interpolation where positions had not turned far, extrapolation where
    they had. transformers' rope_type "dynamic" recomputes the factor from the sequence length
    at every call; this is that rule at one fixed factor."""
    return default_inverse_frequencies(dim, base * factor ** (dim / (dim - 2)))


def llama3_inverse_frequencies(dim: int, base: float, factor: float, low_freq_factor: float,
                               high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1: wavelength < L/high_freq_factor: unchanged; > L/low_freq_factor: divided by
    `factor`; in between, a linear blend in L/wavelength, so the model sees long contexts without
    losing its short-range positional detail."""
    inv_freq = default_inverse_frequencies(dim, base)  # (d/2,)
    lo, hi, old_len = low_freq_factor, high_freq_factor, original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's temperature correction: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inverse_frequencies(dim: int, base: float, factor: float, original_max_position_embeddings: int,
                             beta_fast: float | None = None, beta_slow: float | None = None,
                             truncate: bool = True) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies: theta_i unchanged (extrapolated) where dimension i turns
    more than beta_fast times over the original context L, theta_i / factor (interpolated) where it
    turns fewer than beta_slow times, and a linear ramp over the dimensions in between."""
    beta_fast, beta_slow = beta_fast or 32, beta_slow or 1  # the paper's values (transformers' defaults)

    def dim_of(rotations: float) -> float:
        # The (fractional) dimension index whose wavelength fits `rotations` times into L.
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (d/2,) 0 -> 1
    extrapolate = 1 - ramp  # 1: keep theta_i (fast dimensions), 0: divide it by factor (slow ones)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None,
                          attention_factor: float | None = None) -> float:
    """The factor YaRN multiplies cos and sin by (so q.k by its square). DeepSeek's configs set
    mscale == mscale_all_dim, which makes it 1 here; their softmax scale carries the correction
    instead (`softmax_scale`)."""
    if attention_factor is not None:
        return attention_factor
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def rope_parameters(dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (d/2,), attention factor) for scaling None or rope_type 'default',
    'linear' (position interpolation), 'ntk' (NTK-aware, fixed factor), 'llama3' or 'yarn'."""
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return default_inverse_frequencies(dim, base), 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return linear_inverse_frequencies(dim, base, scaling["factor"]), 1.0
    if kind == "ntk":
        return ntk_inverse_frequencies(dim, base, scaling["factor"]), 1.0
    if kind == "llama3":
        return llama3_inverse_frequencies(dim, base, *(scaling[k] for k in LLAMA3_KEYS)), 1.0
    if kind == "yarn":
        inv_freq = yarn_inverse_frequencies(dim, base, scaling["factor"], scaling["original_max_position_embeddings"],
                                            scaling.get("beta_fast"), scaling.get("beta_slow"),
                                            scaling.get("truncate", True))
        return inv_freq, yarn_attention_factor(scaling["factor"], scaling.get("mscale"),
                                               scaling.get("mscale_all_dim"), scaling.get("attention_factor"))
    raise ValueError(f"rope_type {kind!r} is not supported; the zoo implements 'default', 'linear', 'ntk', "
                     f"'llama3' and 'yarn'")


def softmax_scale(head_dim: int, scaling: dict | None) -> float:
    """DeepSeek's attention scale: 1/sqrt(head_dim), times mscale(factor, mscale_all_dim)^2 under
    YaRN (transformers' `yarn_apply_mscale`): the logits sharpen by the square because q and k
    would each carry one mscale."""
    scale = head_dim ** -0.5
    if scaling is not None and scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


@torch.library.custom_op("zoo::rope_tables", mutates_args=())
def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles: positions (B, T) int, inv_freq (d/2,) -> two (B, T, d) fp32.

    A custom op, so that torch.compile treats it as one opaque kernel whose two small outputs are
    kept (and saved for the backward). Written as plain tensor code, the compiler inlines the
    cos/sin into every kernel that reads the tables: each layer's RoPE recomputed the
    transcendentals for every element of q and k, forward and backward, which cost 9% of the
    compiled training step of the gpt2-124m preset on an H100 (notes/training-loop.md).
    """
    angles = positions[..., None].float() * inv_freq.float()  # (B, T, d/2), in fp32 for accuracy at large positions
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d): the half-split channel layout
    return angles.cos(), angles.sin()


@rope_tables.register_fake
def _rope_tables_shapes(positions, inv_freq):
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


class RotaryEmbedding(nn.Module):
    """Maps absolute positions to the (cos, sin) tables that rotate queries and keys.

    dim: the rotated channels per head; base: rope_theta; scaling: None or a rope_scaling dict
    with its 'rope_type' ('linear', 'ntk', 'llama3' or 'yarn')."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.dim, self.base, self.scaling = dim, base, scaling
        inv_freq, self.attention_factor = rope_parameters(dim, base, scaling)
        # Not persistent: it is derived from the config, and checkpoints do not carry it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the table (a model built on the meta device has none; see build_and_load)."""
        self.inv_freq.copy_(rope_parameters(self.dim, self.base, self.scaling)[0])

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) or (1, T) int -> cos, sin: (B or 1, T, 1, d) fp32, broadcast over heads
        cos, sin = rope_tables(positions, self.inv_freq)
        if self.attention_factor != 1.0:  # YaRN's temperature, as transformers applies it to the tables
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos[:, :, None], sin[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, T, heads, d) by position-dependent angles.

    Pairs are the two halves of the head, not adjacent channels: that is the layout of the
    Hugging Face Llama checkpoints (whose q/k weights were permuted from Meta's interleaved layout).
    The angles are computed in fp32 and the rotation runs in x's dtype, as the reference does:
    under bf16 that saves an upcast of q and k in every layer.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): adjacent pairs become half-split pairs.

    DeepSeek's checkpoints lay the rotary channels out in adjacent pairs (rope_interleave=True);
    `apply_rope(deinterleave(x))` rotates pair (2i, 2i+1) by theta_i and returns it in the
    half-split layout, which is what transformers' `apply_rotary_pos_emb_interleave` returns too.
    q and k both pass through it, so q.k is unchanged by the reordering."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)

"""Quantized KV caches: what a cache stores for each `kv_dtype`, what that costs, and the
quantize-on-write / dequantize-on-read steps that the naive cache and the paged pool share.

The option `kv_dtype` names how cached tensors are stored:
- "fp32", "bf16", "fp16": plain storage in that dtype (None: the model's own dtype);
- "int8": symmetric absmax per token and KV head, x ~ s * q with q = round(x / s) in [-127, 127],
  s = max|x| / 127 over the head's d numbers (one scale per token and head);
- "fp8": e4m3 codes with a scale per token and head, s = max|x| / 448 (e4m3's largest value),
  where torch has float8_e4m3fn;
- "int4": KIVI ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al., 2024,
  arXiv:2402.02750), at 4 bits: keys per channel (each of the d channels of a KV head gets a scale
  and a zero over a group of G consecutive tokens, because key outliers sit in fixed channels),
  values per token (a scale and a zero over the head's d numbers). A key group is quantized only
  once its G tokens exist: the most recent tokens, fewer than G, stay in full precision (the
  *residual*) until their group fills.

The arithmetic (absmax, rounding, 4-bit packing) lives in inference/quantization.py; this file
lays out what is stored and calls it. Scales and zeros are stored in fp16: at head_dim 64 an fp32
scale would cost 6% of an int8 token, and the fp16 rounding of a scale (2^-11 relative) is far below
an int8 step (1/254 of the range). An int4 zero, -min / scale in steps, is rounded by 2^-11 of itself
too: a small fraction of a step unless a group's values sit hundreds of ranges away from 0.
Tested in tests/inference/test_quantized_kv.py (bytes of real tensors against `bytes_per_token`,
caches against a float reference that applies the same quantize/dequantize, int4 against KIVI's
definition, the paged engine against the naive cache).

Layout. Every format stores *groups* of `token_group` tokens (1 for the per-token formats, G for
int4). A per-token tensor `name` of shape `shape` (for a KVSpec, "k" and "v" of (K, d)) becomes the
parts `group_parts(name, shape)`, each of shape (..., n_groups, *part_shape):
    plain:    name (*shape)                       in the plain dtype
    int8/fp8: name (*shape) codes, name_scale (*shape[:-1], 1) fp16
    int4:     "k": k (K, d, G/2) packed codes, k_scale / k_zero (K, d, 1)   (groups along tokens)
              others: v (G, K, d/2) packed codes, v_scale / v_zero (G, K, 1)  (groups along d)
With token_group 1 the naive cache's buffers and the paged pool's blocks keep their plain layout,
(.., tokens, K, d), so the block gather and the Triton kernel read int8/fp8 codes where they lie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference import quantization as Q

PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = Q.KV_DTYPES  # ("int8", "int4", "fp8")
SCALE_DTYPE = torch.float16  # scales and zeros, see the docstring
INT4_GROUP = 64  # tokens per KIVI key group in the naive cache; the paged engine uses its block size
PER_CHANNEL = ("k",)  # int4: the stored names quantized per channel, grouped along tokens (KIVI's keys)


def valid_kv_dtypes() -> tuple[str, ...]:
    return tuple(PLAIN) + QUANTIZED


def dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, d in PLAIN.items() if d == dtype), str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class KVFormat:
    """How one cache stores its per-token tensors (see the module docstring for the layouts)."""
    name: str  # "bf16", "int8", ... as given to kv_dtype
    compute_dtype: torch.dtype  # what reads return: the model's dtype
    token_group: int = 1  # tokens quantized together (G for int4, else 1)

    @property
    def quantized(self) -> bool:
        return self.name in QUANTIZED

    @property
    def residual(self) -> bool:
        """Does the cache keep the newest tokens (a partial group) in full precision?"""
        return self.token_group > 1

    @property
    def kernel_reads(self) -> bool:
        """Can a Triton decode kernel read this storage in place? Plain storage in the model's dtype, int8/fp8
        (inference/triton_paged_attention.py) and int4 with a bf16 model (inference/triton_kivi_attention.py)."""
        if self.name == "int4":
            return self.compute_dtype == torch.bfloat16
        return self.name in ("int8", "fp8") or (not self.quantized and self.storage_dtype == self.compute_dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        quantized = {"int8": torch.int8, "int4": torch.uint8, "fp8": Q.FP8_DTYPE}
        return quantized.get(self.name) or PLAIN.get(self.name, self.compute_dtype)

    def group_parts(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{stored name: (shape of one group, dtype)} for the per-token tensor `name` of `shape`."""
        if not self.quantized:
            return {name: (shape, self.storage_dtype)}
        if self.name in ("int8", "fp8"):
            return {name: (shape, self.storage_dtype), f"{name}_scale": ((*shape[:-1], 1), SCALE_DTYPE)}
        G, n = self.token_group, shape[-1]
        if name in PER_CHANNEL:  # one scale and zero per channel over G tokens: codes packed along tokens
            codes, side = (*shape, G // 2), (*shape, 1)
        else:  # one scale and zero per token over its last dimension
            codes, side = (G, *shape[:-1], n // 2), (G, *shape[:-1], 1)
        return {name: (codes, torch.uint8), f"{name}_scale": (side, SCALE_DTYPE), f"{name}_zero": (side, SCALE_DTYPE)}

    def encode(self, name: str, x: torch.Tensor, ndim: int = 2) -> dict[str, torch.Tensor]:
        """x: (..., n_groups * token_group, *shape), len(shape) == ndim -> {stored name: (..., n_groups, *part)}."""
        if not self.quantized:
            return {name: x.to(self.storage_dtype)}
        if self.name in ("int8", "fp8"):
            quantize = Q.quantize_int8 if self.name == "int8" else Q.quantize_fp8
            q, scale = quantize(x)  # one group per token: the whole last dimension (a head's d numbers)
            return {name: q, f"{name}_scale": _to_scale(scale)}
        G, t = self.token_group, -(ndim + 1)  # t: the token axis
        xg = x.unflatten(t, (x.shape[t] // G, G))  # (..., n_groups, G, *shape)
        if name in PER_CHANNEL:
            # (..., n_groups, *shape, G): the token axis last, where the grouping runs
            packed, scale, zero = Q.quantize_int4(xg.movedim(t, -1), G)
        else:
            packed, scale, zero = Q.quantize_int4(xg, x.shape[-1])
        return {name: packed, f"{name}_scale": _to_scale(scale), f"{name}_zero": _to_scale(zero)}

    def decode(self, name: str, parts: dict[str, torch.Tensor], ndim: int = 2) -> torch.Tensor:
        """The inverse of `encode`: {stored name: (..., n_groups, *part)} -> (..., n_groups * token_group, *shape)
        in the compute dtype."""
        dtype = self.compute_dtype
        if not self.quantized:
            return parts[name].to(dtype)
        scale = parts[f"{name}_scale"].float()
        if self.name == "int8":
            return Q.dequantize_int8(parts[name], scale, dtype)
        if self.name == "fp8":
            return Q.dequantize_fp8(parts[name], scale, dtype)
        t = -(ndim + 1)
        x = Q.dequantize_int4(parts[name], scale, parts[f"{name}_zero"].float(), dtype)
        if name in PER_CHANNEL:
            x = x.movedim(-1, t)  # (..., n_groups, *shape, G) -> (..., n_groups, G, *shape)
        return x.flatten(t - 1, t)  # (..., n_groups * G, *shape)


def _to_scale(s: torch.Tensor) -> torch.Tensor:
    """A float32 scale or zero as stored: fp16, clamped so that no finite scale becomes inf."""
    big = torch.finfo(SCALE_DTYPE).max
    return s.clamp(-big, big).to(SCALE_DTYPE)


def kv_format(kv_dtype: str | None, compute_dtype: torch.dtype, device="cpu", token_group: int | None = None
              ) -> KVFormat:
    """Check `kv_dtype` and return its format. None: plain storage in the model's dtype.

    token_group: tokens per int4 key group (INT4_GROUP if None); ignored by the other formats."""
    if kv_dtype is None:
        return KVFormat(dtype_name(compute_dtype), compute_dtype)
    if not isinstance(kv_dtype, str) or kv_dtype not in valid_kv_dtypes():
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose one of {', '.join(valid_kv_dtypes())} "
                         f"(or None for the model's own dtype)")
    if kv_dtype == "fp8":
        reason = fp8_unavailable_reason(device)
        if reason:
            raise ValueError(f"kv_dtype='fp8': {reason}; use kv_dtype='int8' instead (the same bytes per token)")
    if kv_dtype == "int4":
        G = INT4_GROUP if token_group is None else token_group
        if G < 2 or G % 2:
            raise ValueError(f"int4 packs two tokens' key codes per byte: the token group must be even, got {G}")
        return KVFormat(kv_dtype, compute_dtype, G)
    return KVFormat(kv_dtype, compute_dtype)


def fp8_unavailable_reason(device) -> str | None:
    """None if fp8 (e4m3) storage works here, else which of torch or the device lacks it."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"this torch ({torch.__version__}) has no float8_e4m3fn"
    if not Q.fp8_supported(torch.device(device)):
        return f"the device {torch.device(device)} cannot store float8_e4m3fn"
    return None


def check_int4_shapes(specs: list, fmt: KVFormat) -> None:
    """int4 packs two codes per byte along the grouped axis: every per-token tensor's last dimension must be even."""
    if fmt.name != "int4":
        return
    for i, s in enumerate(specs):
        for name, shape in (s.per_token.items() if s is not None else ()):
            if shape[-1] % 2:
                raise ValueError(f"kv_dtype='int4' packs pairs of numbers: layer {i} caches {name} of width "
                                 f"{shape[-1]}, which is odd; use kv_dtype='int8'")


# ---- what it costs: the one place for quantized bytes ------------------------------------------------


def bytes_per_group(specs: list, fmt: KVFormat) -> int:
    """Bytes one group of `fmt.token_group` tokens costs over all layers, scales and zeros included."""
    total = 0
    for s in specs:
        for name, shape in (s.per_token.items() if s is not None else ()):
            for part, dtype in fmt.group_parts(name, shape).values():
                total += math.prod(part) * _itemsize(dtype)
    return total


def bytes_per_token(specs: list, fmt: KVFormat) -> float:
    """Bytes every cached token costs, summed over layers, scales and zeros included (int4's per-group key
    scales are shared by G tokens, so this can be a fraction; the residual is counted apart, per sequence).
    For Llama 3 in int8: 2 x layers x K x (d x 1 + 2) bytes."""
    return bytes_per_group(specs, fmt) / fmt.token_group


def residual_bytes_per_sequence(specs: list, fmt: KVFormat) -> int:
    """int4: the full-precision tokens a sequence keeps until their group fills, G of them at most."""
    if not fmt.residual:
        return 0
    per_token = sum(math.prod(shape) for s in specs if s is not None for shape in s.per_token.values())
    return fmt.token_group * per_token * _itemsize(fmt.compute_dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()

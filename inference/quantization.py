"""The zoo's number formats for quantization: quantize and dequantize, written once.

Every format splits the LAST dimension of a tensor into groups of `group_size` numbers (None: one
group per row) and stores, per group, low-bit codes plus one or two float32 numbers that map the
codes back to real values. Shapes, for x of shape (..., n) and G = n // group_size groups:
- int8: symmetric absmax. q = round(x / s) in [-127, 127], s = absmax / 127.
  q (..., n) int8, scale (..., G) float32.
- int4: asymmetric min/max. q = round(x / s + z) in [0, 15], s = (max - min) / 15, z = -min / s.
  packed (..., n // 2) uint8 (two codes a byte), scale and zero (..., G) float32.
- nf4: NormalFloat, "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., 2023,
  arXiv:2305.14314): the nearest of 16 levels placed at quantiles of N(0, 1), times the group's
  absmax; optionally the absmaxes themselves quantized to 8 bits (double quantization).
- fp8: float8 e4m3 (4 exponent bits, 3 mantissa bits, largest finite 448) of x / s, s = absmax / 448.
  q (..., n) float8_e4m3fn, scale (..., G) float32.

The zero point z of int4 is kept as a float, not rounded to an integer: then the smallest and
largest value of a group are the codes 0 and 15 exactly and every element is within s/2 of its
dequantized value. (A rounded z makes real 0.0 exact, which matters for zero padding, but shifts
the grid by up to s/2, so the extremes are no longer exact: they can be off by up to half a step.)

Tested against: bitsandbytes' NF4 (`bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`,
then `dequantize_4bit`), bit for bit, in tests/inference/test_quantization.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

WEIGHT_FORMATS = ("int8", "int4", "nf4", "fp8")  # what inference/quantized_linear.py stores weights in
KV_DTYPES = ("int8", "int4", "fp8")  # quantized formats a KV cache may store (full precision is the default)

INT8_MAX = 127  # symmetric: -127..127, so -128 is never used and the grid is symmetric around 0
INT4_LEVELS = 15  # codes 0..15: 15 steps between a group's min and max
FP8_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 * 2^8
FP8_MANTISSA_BITS = 3
DOUBLE_QUANT_BLOCK = 256  # QLoRA quantizes the NF4 absmaxes in blocks of 256

# torch builds without float8 types have no attribute; the check below names the alternative.
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


def check_format(name: str, allowed: tuple[str, ...] = WEIGHT_FORMATS) -> str:
    """`name` if it is one of `allowed`, else a ValueError listing the valid names."""
    if name not in allowed:
        raise ValueError(f"unknown quantization format {name!r}; the valid ones are {', '.join(allowed)}")
    return name


def _nearest_divisors(n: int, g: int) -> str:
    below = max(d for d in range(1, min(g, n) + 1) if n % d == 0)
    above = min((d for d in range(g, n + 1) if n % d == 0), default=None)
    if above is None or above == below:
        return f"the nearest size that divides {n} is {below}"
    return f"the nearest sizes that divide {n} are {below} and {above}"


def _groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """x (..., n) viewed as (..., G, group_size); group_size None is one group of n."""
    n = x.shape[-1]
    g = n if group_size is None else group_size
    if g <= 0 or n % g:
        hint = _nearest_divisors(n, g) if g > 0 else "use a positive size"
        raise ValueError(f"group_size={g} does not divide the last dimension {n}; {hint} (or None: one group per row)")
    return x.reshape(*x.shape[:-1], n // g, g)  # (..., G, g)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # A group of zeros has scale 0; dividing by 1 instead gives codes 0, which decode to 0 exactly.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# ---- int8: symmetric absmax ---------------------------------------------------------------------

def quantize_int8(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) -> (q int8 (..., n), scale float32 (..., G)); x ~= q * scale."""
    xg = _groups(x.float(), group_size)  # (..., G, g)
    scale = xg.abs().amax(-1) / INT8_MAX  # (..., G)
    q = torch.round(xg / _safe(scale)[..., None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8).reshape(x.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = q.float().reshape(*q.shape[:-1], scale.shape[-1], -1)  # (..., G, g)
    return (qg * scale[..., None]).reshape(q.shape).to(dtype)


# ---- int4: asymmetric with a float zero point, two codes a byte ---------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (..., n), n even -> uint8 (..., n // 2). Element 2i goes in the high nibble and 2i+1
    in the low one, the order bitsandbytes uses, so packed NF4 bytes compare equal to its."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two 4-bit codes a byte needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., m) -> codes 0..15 as uint8 (..., 2m), the inverse of `pack_int4`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(*packed.shape[:-1], -1)


def quantize_int4(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., n) -> (packed uint8 (..., n // 2), scale (..., G), zero (..., G)); x ~= (q - zero) * scale."""
    xg = _groups(x.float(), group_size)  # (..., G, g)
    lo, hi = xg.amin(-1), xg.amax(-1)  # (..., G)
    scale = (hi - lo) / INT4_LEVELS
    # A constant group (hi == lo) gets scale 1 and zero -lo: x / 1 - lo = 0 exactly, decoded back to lo.
    scale = _safe(scale)
    zero = -lo / scale
    q = torch.round(xg / scale[..., None] + zero[..., None]).clamp(0, INT4_LEVELS)
    return pack_int4(q.reshape(x.shape)), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).float()  # (..., n)
    qg = q.reshape(*q.shape[:-1], scale.shape[-1], -1)  # (..., G, g)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(q.shape).to(dtype)


# ---- NF4: 16 levels at normal quantiles ---------------------------------------------------------

def _nf4_code() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], built as QLoRA section 3 describes.

    Weights are roughly N(0, sigma); after dividing a group by its absmax, levels that split N(0, 1)
    into equal-probability bins give every code the same share of the weights, which is what
    minimises the expected error for normal data. To have an exact 0 (padding, pruned weights), the
    paper takes 8 quantiles for the positive half and 7 for the negative half, shares the 0, and
    scales both to [-1, 1]. The outermost probability is the middle of 1 - 1/(2*15) and 1 - 1/(2*16)
    (the 15- and 16-level choices), because the quantile of 1 itself is infinite; the reference
    code rounds it to 7 digits (0.9677083) and samples probabilities in float32, and so do we, so
    the levels are bit-identical to bitsandbytes'.
    """
    offset = round(((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2, 7)
    # torch.special.ndtri is the inverse normal CDF (the quantile function).
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 levels > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


NF4_CODE = _nf4_code()  # (16,) float32, ascending, NF4_CODE[7] == 0, NF4_CODE[-1] == 1


class NF4Tensor(NamedTuple):
    """The parts of an NF4-quantized tensor x (..., n) with G = n // group_size groups.

    Without double quantization `absmax` holds the group scales and the three `absmax_*` are None.
    With it (QLoRA section 3, "Double Quantization"), the absmaxes minus their mean `absmax_offset`
    are stored as int8 `absmax_q` in blocks of 256 with one float32 `absmax_scale` per block:
    8 + 32/256 bits per group instead of 32. (QLoRA stores the second level as an 8-bit float; we
    reuse `quantize_int8`, whose error bound is simpler to state.)"""
    packed: torch.Tensor  # uint8 (..., n // 2), two codes a byte
    absmax: torch.Tensor | None  # float32 (..., G), or None when double quantized
    absmax_q: torch.Tensor | None  # int8 (..., G)
    absmax_scale: torch.Tensor | None  # float32 (ceil(numel(absmax) / 256),)
    absmax_offset: torch.Tensor | None  # float32 scalar: the mean absmax


def quantize_nf4(x: torch.Tensor, group_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """x (..., n) -> NF4Tensor; each element becomes the index of the nearest level of x / absmax."""
    xg = _groups(x.float(), group_size)  # (..., G, g)
    absmax = xg.abs().amax(-1)  # (..., G)
    # Multiply by the reciprocal and cut at the midpoints between levels, as bitsandbytes does, so
    # that ties and rounding fall the same way and the codes match bit for bit.
    scaled = (xg * (1.0 / absmax.clamp(min=1e-38))[..., None]).clamp(-1, 1)
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    codes = torch.bucketize(scaled, midpoints.to(x.device))  # (..., G, g) in 0..15
    packed = pack_int4(codes.reshape(x.shape))
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, None)
    offset = absmax.mean()
    flat = absmax.reshape(-1) - offset
    pad = -flat.numel() % DOUBLE_QUANT_BLOCK
    q, scale = quantize_int8(torch.nn.functional.pad(flat, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK))
    return NF4Tensor(packed, None, q.reshape(-1)[:flat.numel()].reshape(absmax.shape), scale.reshape(-1), offset)


def nf4_absmax(t: NF4Tensor) -> torch.Tensor:
    """The float32 group absmaxes of an NF4Tensor, decoding the double quantization if there is one."""
    if t.absmax is not None:
        return t.absmax
    flat = t.absmax_q.reshape(-1)
    pad = -flat.numel() % DOUBLE_QUANT_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)
    decoded = dequantize_int8(blocks, t.absmax_scale[:, None]).reshape(-1)[:flat.numel()]
    return decoded.reshape(t.absmax_q.shape) + t.absmax_offset


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_int4(t.packed)  # (..., n)
    absmax = nf4_absmax(t)  # (..., G)
    values = NF4_CODE.to(codes.device)[codes.long()]
    vg = values.reshape(*values.shape[:-1], absmax.shape[-1], -1)  # (..., G, g)
    return (vg * absmax[..., None]).reshape(values.shape).to(dtype)


# ---- fp8 e4m3 -----------------------------------------------------------------------------------

def fp8_supported(device: str | torch.device = "cpu", matmul: bool = False) -> bool:
    """Whether float8_e4m3fn can be used on `device`.

    Storage only (matmul=False: keep fp8 numbers, convert them to bf16/fp32 before computing, which
    is all this zoo does) needs just a torch with the dtype, on any device. Computing in fp8
    (matmul=True: torch._scaled_mm and fp8 kernels) needs a CUDA GPU of compute capability >= 8.9
    (Ada, Hopper and later)."""
    if FP8_DTYPE is None:
        return False
    if not matmul:
        return True
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def require_fp8(device: str | torch.device = "cpu", matmul: bool = False) -> None:
    """Raise a RuntimeError that says why fp8 is not available and what to use instead."""
    if fp8_supported(device, matmul):
        return
    if FP8_DTYPE is None:
        raise RuntimeError(f"fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} does not have "
                           "(it came in torch 2.1); upgrade torch, or use int8, which works everywhere")
    device = torch.device(device)
    where = (f"{device} has compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
             if device.type == "cuda" else f"device {device} is not a CUDA GPU")
    raise RuntimeError(f"fp8 matmul needs a CUDA GPU of compute capability >= 8.9 and {where}; "
                       "store fp8 and compute in bf16 (matmul=False), or use int8")


def quantize_fp8(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) -> (q float8_e4m3fn (..., n), scale float32 (..., G)); x ~= q * scale."""
    require_fp8(x.device)
    xg = _groups(x.float(), group_size)  # (..., G, g)
    scale = xg.abs().amax(-1) / FP8_MAX  # (..., G)
    # The clamp keeps a value that rounds past 448 finite: e4m3fn has no infinity, it would be NaN.
    q = (xg / _safe(scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = q.float().reshape(*q.shape[:-1], scale.shape[-1], -1)  # (..., G, g)
    return (qg * scale[..., None]).reshape(q.shape).to(dtype)

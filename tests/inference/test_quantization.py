"""The number formats of inference/quantization.py: round-trip error bounds per element, shapes of
the grouped scales, bit-exact NF4 against bitsandbytes, the worked numbers of notes/quantization.md,
and the errors for bad input."""

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inference import quantization as qz
from inference.quantization import (FP8_MAX, KV_DTYPES, NF4_CODE, WEIGHT_FORMATS, check_format, dequantize_fp8,
                                    dequantize_int4, dequantize_int8, dequantize_nf4, fp8_supported, nf4_absmax,
                                    pack_int4, quantize_fp8, quantize_int4, quantize_int8, quantize_nf4,
                                    require_fp8, unpack_int4)

NOTE = Path(__file__).resolve().parents[2] / "notes" / "quantization.md"
# fp32 arithmetic in x / s and q * s adds a few ulps on top of each format's rounding bound.
SLACK = 1e-6


def expand(scale, x, group_size):
    """A per-group tensor (..., G) repeated to x's shape (..., n)."""
    g = x.shape[-1] if group_size is None else group_size
    return scale.repeat_interleave(g, dim=-1)


def sample(seed, shape=(6, 128)):
    g = torch.Generator().manual_seed(seed)
    # Different magnitudes per row, and one row of zeros: scales must not be shared or divide by 0.
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None]
    x[1] = 0
    return x


# ---- error bounds per element -------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_int8_error_is_at_most_half_a_step(group_size):
    x = sample(0)
    q, scale = quantize_int8(x, group_size)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 1 if group_size is None else 128 // group_size)
    err = (x - dequantize_int8(q, scale)).abs()
    s = expand(scale, x, group_size)
    assert (err <= s / 2 + SLACK * x.abs()).all()
    assert (q[1] == 0).all() and (dequantize_int8(q, scale)[1] == 0).all()  # the zero row stays exactly 0
    assert (q[0].abs().max() == 127)  # every other group's absmax lands on code +-127


@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_int4_error_is_at_most_half_a_step(group_size):
    x = sample(1)
    packed, scale, zero = quantize_int4(x, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 64)
    assert scale.shape == zero.shape == (6, 1 if group_size is None else 128 // group_size)
    deq = dequantize_int4(packed, scale, zero)
    s = expand(scale, x, group_size)
    assert ((x - deq).abs() <= s / 2 + SLACK * x.abs()).all()
    # With a float zero point the group's min and max are codes 0 and 15, so they come back exactly
    # (up to fp32 rounding).
    g = 128 if group_size is None else group_size
    xg, dg = x.reshape(6, -1, g), deq.reshape(6, -1, g)
    torch.testing.assert_close(dg.amin(-1), xg.amin(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dg.amax(-1), xg.amax(-1), rtol=1e-6, atol=1e-6)


def test_int4_constant_group_round_trips_exactly():
    x = torch.full((2, 8), -3.25)
    assert torch.equal(dequantize_int4(*quantize_int4(x, 4)), x)


def fp8_bound(x, scale):
    """e4m3 keeps 3 mantissa bits: a normal number is off by at most 2^-4 of itself; below the
    smallest normal (2^-6) the subnormal step is 2^-9, so at most 2^-10. Both in units of the scale."""
    y = x.abs() / qz._safe(scale)
    return (torch.maximum(y * 2.0 ** -(qz.FP8_MANTISSA_BITS + 1), torch.full_like(y, 2.0 ** -10))) * scale


@pytest.mark.parametrize("group_size", [None, 32])
def test_fp8_error_is_within_e4m3_relative_precision(group_size):
    x = sample(2)
    q, scale = quantize_fp8(x, group_size)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert q.float().abs().max() == FP8_MAX  # each group's absmax lands on the largest finite e4m3
    s = expand(scale, x, group_size)
    assert ((x - dequantize_fp8(q, scale)).abs() <= fp8_bound(x, s) + SLACK * x.abs()).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_error_is_at_most_half_the_largest_gap_times_absmax(double_quant):
    x = sample(3, (6, 4096))  # 384 groups: more than one block of 256 scales, the last one partial
    t = quantize_nf4(x, 64, double_quant=double_quant)
    assert t.packed.shape == (6, 2048) and nf4_absmax(t).shape == (6, 64)
    half_gap = NF4_CODE.diff().max() / 2
    true_absmax = x.abs().reshape(6, 64, 64).amax(-1)
    absmax = nf4_absmax(t)
    # Double quantization adds the error of the decoded absmax, times |level| <= 1.
    bound = half_gap * true_absmax + (absmax - true_absmax).abs()
    err = (x - dequantize_nf4(t)).abs().reshape(6, 64, 64)
    assert (err <= bound[..., None] + SLACK * true_absmax[..., None]).all()
    if double_quant:
        assert t.absmax is None and t.absmax_q.dtype == torch.int8 and t.absmax_scale.shape == (2,)
        assert t.absmax_offset.shape == ()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), groups=st.integers(1, 4), group=st.sampled_from([2, 4, 8]),
       log_scale=st.floats(-20, 20), seed=st.integers(0, 2**31 - 1))
def test_int8_and_int4_bounds_hold_at_any_magnitude(rows, groups, group, log_scale, seed):
    x = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * 2.0 ** log_scale
    q, scale = quantize_int8(x, group)
    assert ((x - dequantize_int8(q, scale)).abs() <= expand(scale, x, group) / 2 + SLACK * x.abs()).all()
    packed, scale, zero = quantize_int4(x, group)
    assert ((x - dequantize_int4(packed, scale, zero)).abs() <= expand(scale, x, group) / 2 + SLACK * x.abs()).all()


@settings(max_examples=60, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=32).map(lambda c: c + c[:1] if len(c) % 2 else c))
def test_unpack_inverts_pack(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_int4(c)
    assert packed.shape == (len(codes) // 2,) and torch.equal(unpack_int4(packed), c)
    assert packed[0] == codes[0] * 16 + codes[1]  # first element in the high nibble


def test_grouped_shapes_keep_leading_dims():
    x = torch.randn(2, 3, 5, 64)  # e.g. (B, T, heads, head_dim) as a KV cache stores it
    q, scale = quantize_int8(x, 16)
    assert q.shape == x.shape and scale.shape == (2, 3, 5, 4)
    packed, scale, zero = quantize_int4(x, 32)
    assert packed.shape == (2, 3, 5, 32) and scale.shape == zero.shape == (2, 3, 5, 2)
    q, scale = quantize_fp8(x)
    assert scale.shape == (2, 3, 5, 1)
    assert dequantize_int8(*quantize_int8(x, 16), dtype=torch.bfloat16).dtype == torch.bfloat16


# ---- NF4 against bitsandbytes -------------------------------------------------------------------

def bitsandbytes_functional():
    """bitsandbytes' NF4, the reference (a test dependency in pyproject.toml: its CPU build runs in CI)."""
    import bitsandbytes.functional as bnbf

    return bnbf


def test_nf4_levels_equal_bitsandbytes_code():
    bnbf = bitsandbytes_functional()
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matches_bitsandbytes_exactly(dtype):
    """Exact equality, not a tolerance: both compute x * (1 / absmax) in fp32, pick the level by the
    same fp32 midpoints, and decode as level * absmax in fp32, so every rounding falls the same way."""
    bnbf = bitsandbytes_functional()
    x = (torch.randn(16, 512, generator=torch.Generator().manual_seed(4)) * 0.02).to(dtype)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    reference = bnbf.dequantize_4bit(packed, state, quant_type="nf4", blocksize=64)  # in x's dtype
    ours = quantize_nf4(x, 64)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax.reshape(-1), state.absmax)
    assert reference.dtype == dtype and torch.equal(dequantize_nf4(ours, dtype), reference)


# ---- the worked numbers of notes/quantization.md ------------------------------------------------

def test_worked_numbers_of_the_note():
    note = NOTE.read_text()
    q, scale = quantize_int8(torch.tensor([[0.5, -1.27, 0.02, 1.0]]))
    assert q.tolist() == [[50, -127, 2, 100]] and scale.item() == pytest.approx(0.01)

    packed, scale, zero = quantize_int4(torch.tensor([[-1.0, 0.35, 2.0, 0.0]]), 4)
    assert unpack_int4(packed).tolist() == [[0, 7, 15, 5]] and packed.tolist() == [[7, 245]]
    assert scale.item() == pytest.approx(0.2) and zero.item() == pytest.approx(5.0)
    assert dequantize_int4(packed, scale, zero)[0, 1].item() == pytest.approx(0.4)

    t = quantize_nf4(torch.tensor([[0.8, -0.2, 0.05, -0.4]]), 4)
    assert unpack_int4(t.packed).tolist() == [[15, 4, 8, 2]]
    assert [round(v, 4) for v in dequantize_nf4(t)[0].tolist()] == [0.8, -0.2276, 0.0637, -0.4201]

    q, scale = quantize_fp8(torch.tensor([[1.0, 0.3, -0.07]]))
    assert q.float().tolist() == [[448.0, 128.0, -32.0]]
    assert [round(v, 4) for v in dequantize_fp8(q, scale)[0].tolist()] == [1.0, 0.2857, -0.0714]

    assert round(NF4_CODE.diff().max().item(), 4) == 0.3038
    for shown in ("[50, -127, 2, 100]", "[0, 7, 15, 5]", "[15, 4, 8, 2]", "-0.2276, 0.0637, -0.4201",
                  "[448, 128, -32]", "0.2857", "0.3038"):
        assert shown in note, shown


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4, quantize_fp8, quantize_nf4])
def test_group_size_that_does_not_divide_names_both_numbers_and_a_divisor(quantize):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the last dimension 64; "
                                         r"the nearest sizes that divide 64 are 32 and 64"):
        quantize(torch.randn(2, 64), 48)


def test_int4_needs_an_even_last_dimension():
    with pytest.raises(ValueError, match="even last dimension, got 5"):
        quantize_int4(torch.randn(2, 5), None)


def test_unknown_format_lists_the_valid_ones():
    assert check_format("nf4") == "nf4"
    with pytest.raises(ValueError, match="unknown quantization format 'int3'; the valid ones are int8, int4, nf4, fp8"):
        check_format("int3", WEIGHT_FORMATS)
    with pytest.raises(ValueError, match="'nf4'; the valid ones are int8, int4, fp8"):
        check_format("nf4", KV_DTYPES)


def test_fp8_without_the_dtype_says_to_use_int8(monkeypatch):
    monkeypatch.setattr(qz, "FP8_DTYPE", None)
    assert not fp8_supported("cpu")
    with pytest.raises(RuntimeError, match=rf"torch {re.escape(torch.__version__)} does not have.*use int8"):
        quantize_fp8(torch.randn(2, 8))


def test_fp8_matmul_needs_compute_capability_8_9(monkeypatch):
    assert fp8_supported("cpu") and not fp8_supported("cpu", matmul=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert fp8_supported("cuda:0") and not fp8_supported("cuda:0", matmul=True)
    with pytest.raises(RuntimeError, match=r"capability >= 8.9 and cuda:0 has compute capability 8.0.*int8"):
        require_fp8("cuda:0", matmul=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert fp8_supported("cuda:0", matmul=True)

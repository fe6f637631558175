"""The answers to the exercises of notes/quantization.md, computed from the code and compared with the
hints the note gives."""

from pathlib import Path

import torch

from architectures.llama3 import preset
from inference.memory import cache_specs
from inference.memory import main as memory_main
from inference.quantization import NF4_CODE, dequantize_nf4, quantize_nf4, unpack_int4
from inference.quantized_kv import bytes_per_token, kv_format
from inference.quantized_linear import QuantizedLinear

NOTES = Path(__file__).resolve().parents[2] / "notes"


def test_nf4_group_of_the_exercise(hints):
    t = quantize_nf4(torch.tensor([[0.3, -0.9, 0.0, 0.45]]), 4)
    codes = unpack_int4(t.packed)[0].tolist()
    assert codes == [11, 0, 7, 12]
    assert round(NF4_CODE[12].item(), 4) == 0.4407 and round(NF4_CODE[13].item(), 4) == 0.5626
    assert round(dequantize_nf4(t)[0, 3].item(), 4) == 0.3966
    assert "codes [11, 0, 7, 12]" in hints("quantization") and "0.3966" in hints("quantization")


def test_nf4_bytes_per_weight_at_group_32(hints):
    per_weight = {}
    for double_quant in (False, True):
        layer = QuantizedLinear(4096, 256, "nf4", 32, double_quant=double_quant)
        per_weight[double_quant] = sum(b.numel() * b.element_size() for b in layer.buffers()) / (4096 * 256)
    assert f"{per_weight[False]:.4f}" == "0.6250" and f"{per_weight[True]:.4f}" == "0.5317"
    assert "0.6250" in hints("quantization") and "0.5317" in hints("quantization")


def test_int4_cache_with_blocks_of_32(hints):
    specs = cache_specs("llama3", preset("llama-3.2-1b"))
    int4 = bytes_per_token(specs, kv_format("int4", torch.bfloat16, token_group=32))
    assert int4 == 16 * 8 * ((32 + 64 * 4 / 32) + (32 + 4)) == 9728
    assert memory_main(["--kv-dtype", "int4", "--block-size", "32"])["bytes_per_token"] == 9728
    assert f"{32768 / int4:.2f}x" == "3.37x"
    assert "9,728 bytes, 3.37x" in hints("quantization")


def test_int8_sequences_in_the_memory_of_32_bf16_ones(hints):
    specs = cache_specs("llama3", preset("llama-3.2-1b"))
    bf16 = memory_main([])["bytes_per_token"]
    int8 = bytes_per_token(specs, kv_format("int8", torch.bfloat16))
    assert (bf16, int8) == (32768, 16896)
    assert 32 * bf16 // int8 == 62
    assert "32 x 32,768 / 16,896 = 62.06" in hints("quantization")


def test_step_speedup_if_only_attention_shrinks(hints):
    step, layers, bf16, int8 = 5.58, 16, 0.198, 0.147  # ms of GPU time per step; ms per layer
    lab = " ".join((NOTES / "lab" / "quantization.md").read_text().split())
    assert "bf16 5.85 -> 5.58 ms" in lab and "bf16 212 -> 198 us and int8 163 -> 147 us" in lab  # the measured inputs
    assert f"{step / (step - layers * (bf16 - int8)):.2f}x" == "1.17x"
    needed = bf16 - (step - step / 1.2) / layers  # the per-layer time at which the step is 1.2x
    assert round(needed * 1000, -1) == 140
    assert "1.17x" in hints("quantization") and "about 140 us" in hints("quantization")


def test_a_rounded_int4_zero_point_moves_the_extremes_by_at_most_half_a_step(hints):
    """The note's claim about rounding z: with the float z of `quantize_int4` a group's min and max come
    back exactly; with z rounded to an integer the grid shifts by (z - round(z)) * scale, at most half a
    step, so the extremes move by up to half a step, never a whole one."""
    from inference.quantization import dequantize_int4, pack_int4, quantize_int4

    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    packed, scale, zero = quantize_int4(x, 32)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    exact = dequantize_int4(packed, scale, zero)
    assert torch.allclose(exact.amin(-1, keepdim=True), lo, atol=1e-5)
    assert torch.allclose(exact.amax(-1, keepdim=True), hi, atol=1e-5)

    assert scale.shape == zero.shape == (4096, 1)  # one group of 32 per row
    rounded = zero.round()
    q = torch.round(x / scale + rounded).clamp(0, 15)
    moved = dequantize_int4(pack_int4(q.to(torch.uint8)), scale, rounded)
    step = scale
    off = torch.cat([(moved.amin(-1, keepdim=True) - lo).abs(), (moved.amax(-1, keepdim=True) - hi).abs()], -1) / step
    assert off.max() <= 0.5 + 1e-4  # never a whole step...
    assert off.max() > 0.49  # ...but up to half of one, where the float z had none
    assert ((moved - x).abs() / step).max() <= 0.5 + 1e-4  # every element stays within half a step
    assert "off by up to half a step" in " ".join((NOTES / "quantization.md").read_text().split())

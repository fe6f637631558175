"""The answers to the exercises of notes/llama3.md, computed from the code and compared with the hints
the note gives."""

import math

import torch

from architectures.common.rope import apply_rope
from architectures.llama3 import Llama3, preset
from architectures.llama3.flops import count_parameters
from inference.memory import main as memory_main


def test_kv_cache_of_llama_3_1_8b_at_128k(hints):
    got = memory_main(["--preset", "llama-3.1-8b", "--seq-len", "131072", "--batch", "1"])
    assert got["bytes_per_token"] == 2 * 32 * 8 * 128 * 2 == 131_072
    assert got["naive_bytes"] == 16 * 2**30
    cfg = preset("llama-3.1-8b")
    assert cfg.num_attention_heads == 32 and cfg.num_key_value_heads == 8  # without GQA: 4x the KV heads
    assert 4 * got["naive_bytes"] == 64 * 2**30
    assert "131,072 bytes, 128 KiB per token; 16 GiB per sequence" in hints("llama3") and "64 GiB" in hints("llama3")


def test_rope_rotates_each_pair_by_its_angle():
    d, angle = 4, 0.3
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, d)  # pairs (x0, x2) and (x1, x3)
    theta = torch.tensor([angle, 0.0, angle, 0.0])  # pair 0 turns by 0.3, pair 1 not at all
    out = apply_rope(x, theta.cos(), theta.sin()).flatten().tolist()
    c, s = math.cos(angle), math.sin(angle)
    expected = [1 * c - 3 * s, 2.0, 1 * s + 3 * c, 4.0]  # (x0, x2) -> rotation of the 2-D vector by the angle
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(out, expected))


def test_tiny_preset_parameters(hints):
    cfg = preset("tiny")
    cfg.vocab_size = 512  # the quick start's BPE vocabulary
    assert count_parameters(cfg) == sum(p.numel() for p in Llama3(cfg).parameters()) == 918_656
    assert "918,656" in hints("llama3")

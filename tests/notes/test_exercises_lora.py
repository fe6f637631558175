"""The answer to the scaling exercise of notes/lora.md, from `LoRAConfig.scaling`."""

from training.lora.lora import LoRAConfig


def test_scaling_with_and_without_rslora(hints):
    assert (LoRAConfig(r=16, alpha=16).scaling, LoRAConfig(r=16, alpha=16, use_rslora=True).scaling) == (1.0, 4.0)
    assert (LoRAConfig(r=64, alpha=16).scaling, LoRAConfig(r=64, alpha=16, use_rslora=True).scaling) == (0.25, 2.0)
    assert "alpha / r = 1 and alpha / √r = 4; at rank 64, 0.25 against 2" in hints("lora")

"""LoRA and DoRA adapters that save and load in PEFT's format (notes/lora.md)."""

from training.lora.lora import (ALL_PROJECTIONS, LoRAConfig, LoRALinear, apply_lora, disable_adapters, merge,
                                trainable_parameters, unmerge)
from training.lora.peft_format import load_adapter, save_adapter

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "load_adapter", "save_adapter", "merge", "unmerge",
           "disable_adapters", "trainable_parameters", "ALL_PROJECTIONS"]

"""Mamba-2 and its hybrids (Nemotron-H): selective state spaces computed by SSD, mixed per layer with
Llama 3's attention, an MLP and a mixture of experts."""

from architectures.mamba2_hybrid.config import PRESETS, Mamba2HybridConfig, preset
from architectures.mamba2_hybrid.model import Mamba2Hybrid
from architectures.mamba2_hybrid.pretrained import from_pretrained, save_pretrained

__all__ = ["Mamba2Hybrid", "Mamba2HybridConfig", "PRESETS", "preset", "from_pretrained", "save_pretrained"]

"""Gemma 2 and Gemma 3 (text): local and global attention, soft-capping, QK-norm."""

from architectures.gemma.config import PRESETS, GemmaConfig, preset
from architectures.gemma.model import Gemma
from architectures.gemma.pretrained import from_pretrained, save_pretrained

__all__ = ["Gemma", "GemmaConfig", "PRESETS", "preset", "from_pretrained", "save_pretrained"]

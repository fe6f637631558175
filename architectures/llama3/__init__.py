"""Llama 3: the base every other architecture in the zoo builds on."""

from architectures.llama3.config import PRESETS, LlamaConfig, preset
from architectures.llama3.model import Llama3
from architectures.llama3.pretrained import from_pretrained, save_pretrained

__all__ = ["Llama3", "LlamaConfig", "PRESETS", "preset", "from_pretrained", "save_pretrained"]

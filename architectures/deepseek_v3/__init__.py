"""DeepSeek-V3 (and Kimi K2, the same architecture): multi-head latent attention and DeepSeekMoE."""

from architectures.deepseek_v3.config import PRESETS, DeepseekV3Config, preset
from architectures.deepseek_v3.model import DeepseekV3
from architectures.deepseek_v3.moe import update_routing_bias
from architectures.deepseek_v3.pretrained import from_pretrained, save_pretrained

__all__ = ["DeepseekV3", "DeepseekV3Config", "PRESETS", "preset", "from_pretrained", "save_pretrained",
           "update_routing_bias"]

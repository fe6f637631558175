"""Mixtral: Llama 3 with a sparse mixture-of-experts feed-forward."""

from architectures.mixtral.config import PRESETS, MixtralConfig, preset
from architectures.mixtral.losses import load_balancing_loss, moe_lm_loss, router_z_loss
from architectures.mixtral.model import Mixtral
from architectures.mixtral.pretrained import from_pretrained, save_pretrained

__all__ = ["Mixtral", "MixtralConfig", "PRESETS", "preset", "from_pretrained", "save_pretrained",
           "moe_lm_loss", "load_balancing_loss", "router_z_loss"]

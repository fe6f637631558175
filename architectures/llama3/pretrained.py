"""Load and save Llama 3 checkpoints in the Hugging Face layout (what meta-llama publishes on the hub).

Tensor names are transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), which are
also our module names, so loading is a strict name-by-name copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from architectures.common.checkpoint import build_and_load, read_config_json, save_weights
from architectures.utils.files import atomic_write_json
from architectures.llama3.config import from_hf_config, to_hf_config
from architectures.llama3.model import Llama3


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama3:
    """Read config.json + (sharded) safetensors from `path`; returns the model in eval mode."""
    cfg = from_hf_config(read_config_json(path), where=f"{path}/config.json")
    return build_and_load(cfg, Llama3, path, dtype, device)


def save_pretrained(model: Llama3, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors that both this zoo and transformers load."""
    save_weights(model, path, state_dict)
    atomic_write_json(Path(path) / "config.json", to_hf_config(model.config))

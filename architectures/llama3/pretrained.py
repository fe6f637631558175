"""Load and save Llama 3 checkpoints in the Hugging Face layout (what meta-llama publishes on the hub).

Tensor names are transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), which are
also our module names, so loading is a strict name-by-name copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from architectures.common.checkpoint import (atomic_write_json, load_state_dict_strict, load_weights,
                                             read_config_json, save_weights)
from architectures.llama3.config import LlamaConfig, from_hf_config, to_hf_config
from architectures.llama3.model import Llama3, rope_inverse_frequencies


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama3:
    """Read config.json + (sharded) safetensors from `path`; returns the model in eval mode."""
    cfg = from_hf_config(read_config_json(path), where=f"{path}/config.json")
    # Build on the meta device (no memory, no random init: every weight is overwritten below),
    # then allocate; the RoPE table is derived from the config, and the tie is re-made by hand.
    with torch.device("meta"):
        model = Llama3(cfg)
    model = model.to_empty(device=device)
    model.model.rotary_emb.inv_freq.copy_(rope_inverse_frequencies(cfg))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_dict_strict(model, load_weights(path), where=str(path))
    return model.to(dtype=dtype).eval()


def save_pretrained(model: Llama3, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors that both this zoo and transformers load."""
    save_weights(model, path, state_dict)
    atomic_write_json(Path(path) / "config.json", to_hf_config(model.config))

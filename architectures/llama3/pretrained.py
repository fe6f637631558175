"""Load and save Llama 3 checkpoints in the Hugging Face layout (what meta-llama publishes on the hub).

Tensor names are transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), which are
also our module names, so loading is a strict name-by-name copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from architectures.common.checkpoint import (atomic_write_json, load_state_dict_strict, load_weights,
                                             read_config_json, save_weights)
from architectures.llama3.config import LlamaConfig, from_hf_config, to_hf_config
from architectures.llama3.model import Llama3, rope_inverse_frequencies


def build_and_load(cfg: LlamaConfig, model_cls, path: str | Path, dtype: torch.dtype, device,
                   convert: Callable[[dict], dict] = lambda state: state) -> Llama3:
    """Build `model_cls(cfg)` without initialising it and fill it with the tensors in `path`.

    Shared by every architecture built on Llama 3; `convert` maps the file's tensor names and
    layout to the model's (Mixtral's per-expert hub layout to its fused experts, say)."""
    # Build on the meta device (no memory, no random init: every weight is overwritten below),
    # then allocate; the RoPE table is derived from the config, and the tie is re-made by hand.
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device=device)
    model.model.rotary_emb.inv_freq.copy_(rope_inverse_frequencies(cfg))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_dict_strict(model, convert(load_weights(path)), where=str(path))
    return model.to(dtype=dtype).eval()


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama3:
    """Read config.json + (sharded) safetensors from `path`; returns the model in eval mode."""
    cfg = from_hf_config(read_config_json(path), where=f"{path}/config.json")
    return build_and_load(cfg, Llama3, path, dtype, device)


def save_pretrained(model: Llama3, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors that both this zoo and transformers load."""
    save_weights(model, path, state_dict)
    atomic_write_json(Path(path) / "config.json", to_hf_config(model.config))

"""Load and save Gemma 2 and Gemma 3 checkpoints in the Hugging Face layout (what google publishes on the hub).

Text-only checkpoints (Gemma 2, gemma-3-1b; model_type "gemma2" / "gemma3_text") name their tensors as
our modules do (`model.layers.0.self_attn.q_norm.weight`, ...): loading is a strict name-by-name copy.
A multimodal Gemma 3 (model_type "gemma3": 4B, 12B, 27B) holds the same text model beside a vision
tower; its text weights are read and the rest left out, under either of two layouts:
- as published on the hub: `language_model.model.layers.0...` (and `language_model.lm_head.weight`);
- as transformers 5 saves `Gemma3ForConditionalGeneration`: `model.language_model.layers.0...`.
`save_pretrained` writes the text model alone, a Gemma2ForCausalLM or Gemma3ForCausalLM directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from architectures.common.checkpoint import build_and_load, read_config_json, save_weights
from architectures.gemma.config import from_hf_config, to_hf_config
from architectures.gemma.model import Gemma
from architectures.utils.files import atomic_write_json

# A multimodal checkpoint's text-model prefixes -> ours, and what is not the text model.
TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                 "language_model.lm_head.": "lm_head."}
NOT_TEXT = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


def text_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text model's tensors of a multimodal Gemma 3 checkpoint, under our names; a tensor that is
    neither the text model's nor the vision tower's or projector's stays, so the strict load names it."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(NOT_TEXT):
            continue
        prefix = next((p for p in TEXT_PREFIXES if name.startswith(p)), None)
        out[TEXT_PREFIXES[prefix] + name[len(prefix):] if prefix else name] = tensor
    return out


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma:
    """Read config.json + (sharded) safetensors from `path`; returns the model in eval mode."""
    d = read_config_json(path)
    cfg = from_hf_config(d, where=f"{path}/config.json")
    convert = text_weights if d.get("model_type") == "gemma3" else (lambda state: state)
    return build_and_load(cfg, Gemma, path, dtype, device, convert=convert)


def save_pretrained(model: Gemma, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors that both this zoo and transformers load."""
    save_weights(model, path, state_dict)
    atomic_write_json(Path(path) / "config.json", to_hf_config(model.config))

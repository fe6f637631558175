"""Load and save Mamba-2 and Nemotron-H checkpoints in the Hugging Face layouts, single file or sharded.

Both transformers classes write the same names, which are our module names: `backbone.embeddings`,
`backbone.layers.{i}.norm`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f`, `lm_head`. What needs
converting:
- MoE experts: the hub stores them one by one, `mixer.experts.{e}.up_proj.weight` (F, d) and
  `.down_proj.weight` (d, F); the model stacks them, `mixer.experts.up_proj` (E, F, d).
- older Mamba-2 files name the embedding `backbone.embedding` (transformers renames it on load too);
- a tied head may be absent from the file (transformers writes it once);
- Nemotron-H's multi-token-prediction layers (`mtp.*`) are skipped, as transformers skips them.
A convolution whose kernel width disagrees with config.json is named before anything is copied.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from architectures.common.checkpoint import build_and_load, read_config_json, save_weights
from architectures.utils.files import atomic_write_json
from architectures.mamba2_hybrid.config import Mamba2HybridConfig, from_hf_config, to_hf_config
from architectures.mamba2_hybrid.model import Mamba2Hybrid

HUB_EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
CONV = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.conv1d\.weight$")


def hub_to_stacked(state: dict[str, torch.Tensor], cfg: Mamba2HybridConfig, where: str) -> dict[str, torch.Tensor]:
    """Per-expert up/down weights -> one (E, ...) tensor per MoE layer; every missing expert is named."""
    experts, out = {}, {}
    for name, t in state.items():
        if m := HUB_EXPERT.match(name):
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            out[name] = t
    E = cfg.n_routed_experts
    for prefix, found in experts.items():
        missing = [f"{prefix}.{e}.{w}.weight" for e in range(E) for w in ("up_proj", "down_proj") if (e, w) not in found]
        extra = sorted(f"{prefix}.{e}.{w}.weight" for e, w in found if e >= E)
        if missing or extra:
            raise ValueError(f"{where}: {'missing tensors ' + str(missing[:6]) if missing else ''}"
                             f"{' unexpected tensors ' + str(extra[:6]) if extra else ''}: config.json says "
                             f"n_routed_experts={E}")
        for w in ("up_proj", "down_proj"):
            out[f"{prefix}.{w}"] = torch.stack([found[(e, w)] for e in range(E)])
    return out


def stacked_to_hub(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hub_to_stacked`: (E, ...) expert tensors -> one tensor per expert."""
    out = {}
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".experts.")
        if prefix and leaf in ("up_proj", "down_proj"):
            for e, w in enumerate(t):
                out[f"{prefix}.experts.{e}.{leaf}.weight"] = w.contiguous()
        else:
            out[name] = t
    return out


def check_conv_kernels(state: dict[str, torch.Tensor], cfg: Mamba2HybridConfig, where: str) -> None:
    for name, t in state.items():
        if CONV.match(name) and t.dim() == 3 and t.shape[-1] != cfg.conv_kernel:
            raise ValueError(f"{where}: {name} has a kernel of width {t.shape[-1]} but config.json says conv_kernel="
                             f"{cfg.conv_kernel}; the weights and config.json come from different models")


def convert(state: dict[str, torch.Tensor], cfg: Mamba2HybridConfig, where: str) -> dict[str, torch.Tensor]:
    state = {n.replace("backbone.embedding.", "backbone.embeddings."): t for n, t in state.items()
             if not n.startswith("mtp.")}
    check_conv_kernels(state, cfg, where)
    state = hub_to_stacked(state, cfg, where)
    return state


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Mamba2Hybrid:
    """Read config.json + (sharded) safetensors of a Mamba2 or NemotronH checkpoint; returns the model in eval mode."""
    cfg = from_hf_config(read_config_json(path), where=f"{path}/config.json")
    return build_and_load(cfg, Mamba2Hybrid, path, dtype, device, lambda state: convert(state, cfg, str(path)))


def save_pretrained(model: Mamba2Hybrid, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and a hub-layout model.safetensors that this zoo and transformers both load."""
    hf_config = to_hf_config(model.config)  # first: a config transformers cannot express fails before any write
    save_weights(model, path, stacked_to_hub(state_dict if state_dict is not None else model.state_dict()))
    atomic_write_json(Path(path) / "config.json", hf_config)

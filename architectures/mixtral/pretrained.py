"""Load and save Mixtral checkpoints in the Hugging Face layouts, single file or sharded.

Two layouts exist on disk, and both load:

- the hub layout, which mistralai publishes and transformers' `save_pretrained` writes by default
  (v4, and v5, which converts back on save): per-expert matrices under `block_sparse_moe`,
      model.layers.{i}.block_sparse_moe.gate.weight           (E, D)  the router
      model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight (F, D)  W_gate
      model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight (F, D)  W_up
      model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight (D, F)  W_down
- the fused layout of transformers 5's in-memory model (`save_pretrained(save_original_format=False)`),
  which is also ours, so it loads by name:
      model.layers.{i}.mlp.gate.weight (E, D), mlp.experts.gate_up_proj (E, 2F, D), mlp.experts.down_proj (E, D, F)

The conversion is transformers' own (conversion_mapping.py, "mixtral"): rename block_sparse_moe
to mlp, gate_up_proj[e] = concat(w1[e], w3[e]) along rows, down_proj[e] = w2[e].
`save_pretrained` writes the hub layout, which every Mixtral loader reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from architectures.common.checkpoint import build_and_load, read_config_json, save_weights
from architectures.utils.files import atomic_write_json
from architectures.mixtral.config import MixtralConfig, from_hf_config, to_hf_config
from architectures.mixtral.model import Mixtral

HUB_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
HUB_ROUTER = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def hub_to_fused(state: dict[str, torch.Tensor], cfg: MixtralConfig, where: str) -> dict[str, torch.Tensor]:
    """Per-expert w1/w2/w3 -> stacked gate_up_proj / down_proj. A state without block_sparse_moe
    names is already fused and is returned as is. Every missing router or expert matrix is named."""
    if not any(".block_sparse_moe." in name for name in state):
        return state
    out, experts = {}, {}
    for name, tensor in state.items():
        if m := HUB_EXPERT.match(name):
            experts[(int(m[1]), int(m[2]), m[3])] = tensor
        elif m := HUB_ROUTER.match(name):
            out[f"model.layers.{m[1]}.mlp.gate.weight"] = tensor
        else:
            out[name] = tensor  # attention, norms, embedding, head: same names in both layouts
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    wanted = {(i, e, w) for i in range(L) for e in range(E) for w in ("w1", "w2", "w3")}
    name = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight".format
    missing = [name(*key) for key in sorted(wanted - set(experts))]
    missing += [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(L)
                if f"model.layers.{i}.mlp.gate.weight" not in out]
    if missing:
        raise ValueError(
            f"{where}: expert weights missing from the checkpoint: {missing}; "
            f"config.json says {L} layers, each with a router (gate) and num_local_experts={E} experts of w1, w2, "
            f"w3. A shard may be missing or truncated, or config.json belongs to another model"
        )
    extra = sorted(set(experts) - wanted)
    if extra:
        raise ValueError(
            f"{where}: unexpected tensors {[name(*key) for key in extra]}: the checkpoint has more experts or "
            f"layers than config.json (num_local_experts={E}, num_hidden_layers={L})"
        )
    out.update(stack_experts(experts, range(L), E, ("w1", "w3", "w2")))
    return out


def stack_experts(experts: dict[tuple[int, int, str], torch.Tensor], layers, num_experts: int,
                  names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """Per-expert matrices {(layer, expert, name): tensor} -> the fused layout of `StackedExperts`:
    gate_up_proj[e] = [W_gate; W_up] (E, 2F, D) and down_proj[e] = W_down (E, D, F), per layer.
    names: what the checkpoint calls (W_gate, W_up, W_down): ("w1", "w3", "w2") in Mixtral's."""
    gate, up, down = names
    out = {}
    for i in layers:
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts.pop((i, e, gate)), experts.pop((i, e, up))]) for e in range(num_experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [experts.pop((i, e, down)) for e in range(num_experts)])
    return out


def unstack_experts(prefix: str, fused: str, tensor: torch.Tensor, names: tuple[str, str, str]) -> dict:
    """The inverse of `stack_experts` for one fused tensor: gate_up_proj (E, 2F, D) -> per-expert W_gate
    and W_up, or down_proj (E, D, F) -> per-expert W_down, named {prefix}.{e}.{name}.weight."""
    gate, up, down = names
    if fused == "down_proj":
        return {f"{prefix}.{e}.{down}.weight": w.contiguous() for e, w in enumerate(tensor)}
    out = {}
    for e, (w_gate, w_up) in enumerate(t.chunk(2) for t in tensor):
        out[f"{prefix}.{e}.{gate}.weight"], out[f"{prefix}.{e}.{up}.weight"] = w_gate.contiguous(), w_up.contiguous()
    return out


def fused_to_hub(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hub_to_fused`: our state dict -> per-expert hub names."""
    out = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".mlp.")
        if not prefix:
            out[name] = tensor
        elif leaf == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = tensor
        elif leaf in ("experts.gate_up_proj", "experts.down_proj"):
            out.update(unstack_experts(f"{prefix}.block_sparse_moe.experts", leaf.split(".")[1], tensor,
                                       ("w1", "w3", "w2")))
        else:
            raise ValueError(f"no hub name for {name}")
    return out


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Mixtral:
    """Read config.json + (sharded) safetensors in either layout from `path`; returns the model in eval mode."""
    cfg = from_hf_config(read_config_json(path), where=f"{path}/config.json")
    return build_and_load(cfg, Mixtral, path, dtype, device, lambda state: hub_to_fused(state, cfg, str(path)))


def save_pretrained(model: Mixtral, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and a hub-layout model.safetensors that this zoo and transformers both load."""
    save_weights(model, path, fused_to_hub(state_dict if state_dict is not None else model.state_dict()))
    atomic_write_json(Path(path) / "config.json", to_hf_config(model.config))

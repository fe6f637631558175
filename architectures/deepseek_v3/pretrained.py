"""Load and save DeepSeek-V3 / Kimi K2 checkpoints in the Hugging Face layouts, single file or sharded.

What the hub's directories hold, and what loading does with each:

- per-expert matrices, the layout DeepSeek publishes and transformers 5's `save_pretrained` writes:
      model.layers.{i}.mlp.experts.{e}.gate_proj.weight (F, D)   W_gate
      model.layers.{i}.mlp.experts.{e}.up_proj.weight   (F, D)   W_up
      model.layers.{i}.mlp.experts.{e}.down_proj.weight (D, F)   W_down
  stacked into Mixtral's grouped layout: mlp.experts.gate_up_proj (E, 2F, D) = [W_gate; W_up] per
  expert, mlp.experts.down_proj (E, D, F). The stacked layout itself (transformers'
  `save_original_format=False`) is ours and loads by name.
- the multi-token-prediction module, `model.layers.{num_hidden_layers}.*` (DeepSeek-V3 ships one,
  used for speculative decoding; recognised by its `eh_proj`): skipped, with a one-line notice.
- FP8 weights (DeepSeek-V3 and Kimi K2 are published so): a float8_e4m3fn `W.weight` with a
  `W.weight_scale_inv` of one fp32 scale per 128 x 128 block (quantization_config.weight_block_size);
  weight = fp8 * scale_inv of its block, the partial blocks at the right and bottom edges included.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from architectures.common.checkpoint import build_and_load, read_config_json, save_weights
from architectures.utils.files import atomic_write_json
from architectures.deepseek_v3.config import DeepseekV3Config, from_hf_config, to_hf_config
from architectures.deepseek_v3.model import DeepseekV3
from architectures.mixtral.pretrained import stack_experts, unstack_experts

HUB_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MTP_PROJ = re.compile(r"^model\.layers\.(\d+)\.eh_proj\.weight$")  # the MTP module's [h; emb] -> D projection
FP8_TYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def dequantize_fp8(state: dict[str, torch.Tensor], block: tuple[int, int] = (128, 128),
                   where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every FP8 `X.weight` times its `X.weight_scale_inv`, broadcast over (block[0] x block[1]) blocks -> fp32.

    weight: (out, in) fp8; scale_inv: (ceil(out / b0), ceil(in / b1)) fp32. Other tensors pass through."""
    out, scales = {}, {n for n in state if n.endswith(".weight_scale_inv")}
    for name, t in state.items():
        if name in scales:
            continue
        if t.dtype in FP8_TYPES:
            scale_name = name + "_scale_inv"
            if scale_name not in state:
                raise ValueError(f"{where}: {name} is stored in {t.dtype} but its scale {scale_name} is missing; "
                                 f"an FP8 weight cannot be read without its per-block scales")
            s = state[scale_name].float()
            rows, cols = t.shape
            want = (-(-rows // block[0]), -(-cols // block[1]))
            if tuple(s.shape) != want:
                raise ValueError(f"{where}: {scale_name} has shape {tuple(s.shape)}; a {rows}x{cols} weight in "
                                 f"{block[0]}x{block[1]} blocks needs {want}")
            s = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]  # (out, in)
            out[name] = t.float() * s
        else:
            out[name] = t
    orphans = sorted(n for n in scales if n.removesuffix("_scale_inv") not in state)
    if orphans:
        raise ValueError(f"{where}: scales {orphans} have no weight beside them")
    return out


def skip_mtp_layers(state: dict[str, torch.Tensor], cfg: DeepseekV3Config, where: str) -> dict[str, torch.Tensor]:
    """Drop the multi-token-prediction modules: the layers i >= num_hidden_layers that carry an MTP
    projection `model.layers.{i}.eh_proj.weight`. Any other layer beyond num_hidden_layers stays, so
    that a config.json with too few layers is still reported as unexpected tensors."""
    L = cfg.num_hidden_layers
    mtp = sorted({int(m[1]) for n in state if (m := MTP_PROJ.match(n)) and int(m[1]) >= L})
    if not mtp:
        return state
    print(f"{where}: skipping the multi-token-prediction layer(s) model.layers.{mtp} (speculative decoding "
          f"only; the model has num_hidden_layers={L})")
    return {n: t for n, t in state.items() if not ((m := LAYER.match(n)) and int(m[1]) in mtp)}


def hub_to_fused(state: dict[str, torch.Tensor], cfg: DeepseekV3Config, where: str) -> dict[str, torch.Tensor]:
    """Per-expert gate_proj/up_proj/down_proj -> stacked gate_up_proj / down_proj of each MoE layer.
    Every missing expert matrix is named; a state without per-expert names is returned as is."""
    experts, out = {}, {}
    for name, t in state.items():
        if m := HUB_EXPERT.match(name):
            experts[(int(m[1]), int(m[2]), m[3])] = t
        else:
            out[name] = t
    if not experts:
        return state
    E = cfg.n_routed_experts
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    wanted = {(i, e, w) for i in moe_layers for e in range(E) for w in ("gate_proj", "up_proj", "down_proj")}
    name = "model.layers.{}.mlp.experts.{}.{}.weight".format
    missing = [name(*key) for key in sorted(wanted - set(experts))]
    if missing:
        raise ValueError(
            f"{where}: expert weights missing from the checkpoint: {missing[:6]}{' ...' if len(missing) > 6 else ''} "
            f"({len(missing)} in all); config.json says layers {moe_layers} each have n_routed_experts={E} experts. "
            f"A shard may be missing, or config.json belongs to another model")
    extra = sorted(set(experts) - wanted)
    if extra:
        raise ValueError(f"{where}: unexpected tensors {[name(*k) for k in extra][:6]}: the checkpoint has more "
                         f"experts or MoE layers than config.json (n_routed_experts={E}, "
                         f"first_k_dense_replace={cfg.first_k_dense_replace})")
    out.update(stack_experts(experts, moe_layers, E, ("gate_proj", "up_proj", "down_proj")))
    return out


def fused_to_hub(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hub_to_fused`: our state dict -> per-expert hub names."""
    out = {}
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".mlp.experts.")
        if not prefix:
            out[name] = t
        elif leaf in ("gate_up_proj", "down_proj"):
            out.update(unstack_experts(f"{prefix}.mlp.experts", leaf, t, ("gate_proj", "up_proj", "down_proj")))
        else:
            raise ValueError(f"no hub name for {name}")
    return out


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> DeepseekV3:
    """Read config.json + (sharded) safetensors, FP8 or not, from `path`; returns the model in eval mode."""
    raw = read_config_json(path)
    cfg = from_hf_config(raw, where=f"{path}/config.json")
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    where = str(path)

    def convert(state):
        state = skip_mtp_layers(state, cfg, where)
        return hub_to_fused(dequantize_fp8(state, block, where), cfg, where)

    return build_and_load(cfg, DeepseekV3, path, dtype, device, convert)


def save_pretrained(model: DeepseekV3, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and a hub-layout model.safetensors that this zoo and transformers both load."""
    save_weights(model, path, fused_to_hub(state_dict if state_dict is not None else model.state_dict()))
    atomic_write_json(Path(path) / "config.json", to_hf_config(model.config))

"""Adapters on disk in PEFT's format, so what we train loads with `PeftModel.from_pretrained` and
what PEFT trains loads here.

A directory holds two files:
- `adapter_config.json`: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout,
  target_modules (a list of suffixes or one regex), use_rslora, use_dora, and PEFT's other
  options at the values that mean "plain LoRA" (bias "none", fan_in_fan_out false, ...);
- `adapter_model.safetensors`: for each adapted module NAME of the causal LM,
  `base_model.model.NAME.lora_A.weight` (r, d_in), `base_model.model.NAME.lora_B.weight`
  (d_out, r), and with DoRA `base_model.model.NAME.lora_magnitude_vector` (d_out,). PEFT wraps
  the model twice (PeftModel.base_model is a LoraModel whose .model is the causal LM) and drops
  the adapter's name ("default") from the keys, hence the prefix.
Tested against peft 0.21's `save_pretrained` and `PeftModel.from_pretrained` (tests/training/lora/test_lora.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from architectures.utils.files import atomic_write, atomic_write_json
from training.lora.lora import LoRAConfig, apply_lora, find_targets, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the causal LM

# PEFT options that change what an adapter computes, at the values that mean plain LoRA. An adapter
# whose config sets any of them otherwise is refused rather than loaded into a different function.
PLAIN_LORA = {
    "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None, "exclude_modules": None,
    "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
    "trainable_token_indices": None, "layer_replication": None, "use_qalora": False, "use_bdlora": None,
    "alora_invocation_tokens": None, "arrow_config": None, "velora_config": None, "monteclora_config": None,
    "kasa_config": None,
}


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """A missing adapter directory or file: a FileNotFoundError, as the zoo's other missing
    checkpoint files are, and a ValueError, as every other bad adapter input is."""


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json's content, with the keys PEFT writes for a plain causal-LM LoRA."""
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    record = {
        **PLAIN_LORA,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_pattern": None,
        "revision": None,
        "auto_mapping": None,
    }
    return dict(sorted(record.items()))


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write the model's adapters (not its frozen base) as PEFT does, each file atomically."""
    layers = lora_layers(model)
    config = getattr(model, "lora_config", None)
    if not layers or config is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save; call apply_lora or load_adapter first")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, peft_config_dict(config, base_model_name_or_path))


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """adapter_config.json as a LoRAConfig, refusing adapter types and options we do not implement."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise AdapterNotFoundError(f"adapter directory {directory} does not exist; pass the directory that "
                                   f"save_adapter (or PEFT's save_pretrained) wrote")
    if not path.is_file():
        raise AdapterNotFoundError(f"{directory} has no {CONFIG_FILE} (found: {sorted(p.name for p in Path(directory).iterdir())}); "
                                   f"an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupted or truncated") from e
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{path} describes a PEFT adapter of type {kind!r}; only LORA adapters "
                         f"(peft_type \"LORA\", with or without DoRA) are supported")
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path} has task_type {task!r}; only causal-LM adapters (task_type \"CAUSAL_LM\") are "
                         f"supported, whose tensors are named base_model.model.<module>")
    for key, plain in PLAIN_LORA.items():
        value = raw.get(key, plain)
        if value != plain and not (value in (None, False, {}, []) and plain in (None, False, {}, [])):
            raise ValueError(f"{path} sets {key}={value!r}, which this implementation does not support; "
                             f"LORA adapters with {key}={plain!r} are supported (plain LoRA or DoRA on linear layers)")
    if raw.get("target_modules") is None:
        raise ValueError(f"{path} has no target_modules; name the linear layers the adapter applies to")
    return LoRAConfig(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                      target_modules=raw["target_modules"], use_rslora=bool(raw.get("use_rslora", False)),
                      use_dora=bool(raw.get("use_dora", False)))


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterNotFoundError(f"{file.parent} has no {WEIGHTS_FILE} (found: {sorted(p.name for p in file.parent.iterdir())}); "
                                   f"save the adapter again (a PEFT adapter saved as .bin: save it with "
                                   f"safe_serialization=True)")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}. The file is truncated or corrupted; save it again") from e


def expected_shapes(model: nn.Module, targets: list[str], config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """File tensor name -> shape that the adapter of each target module needs."""
    shapes = {}
    for name in targets:
        m = model.get_submodule(name)
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (config.r, m.in_features)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, config.r)
        if config.use_dora:
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (m.out_features,)
    return shapes


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply the adapter saved in adapter_dir (ours or PEFT's) to `model`, in place.

    Everything is checked before the model is touched: the config, that its targets match, and
    that the file holds exactly the tensors those targets need, each of the right shape."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    state = _read_tensors(adapter_dir / WEIGHTS_FILE)
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; load an adapter onto a fresh base model")
    targets = find_targets(model, config)
    shapes = expected_shapes(model, targets, config)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        parts = ([f"missing tensors {missing}"] if missing else []) + \
                ([f"tensors for no targeted module of this model {unexpected}"] if unexpected else [])
        raise ValueError(f"{adapter_dir / WEIGHTS_FILE} does not match target_modules={config.target_modules!r} "
                         f"on {type(model).__name__}: " + "; ".join(parts) +
                         ". Was the adapter trained on another architecture?")
    wrong = [f"{n}: file {tuple(state[n].shape)} vs model {shape}" for n, shape in shapes.items()
             if tuple(state[n].shape) != shape]
    if wrong:
        raise ValueError(f"{adapter_dir / WEIGHTS_FILE}: adapter tensor shapes do not match the model "
                         f"(r={config.r} in adapter_config.json): {'; '.join(wrong)}. Load the base model the "
                         f"adapter was trained on")
    apply_lora(model, config)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(state[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(state[f"{PREFIX}{name}.lora_B.weight"])
            if layer.use_dora:
                layer.lora_magnitude_vector.copy_(state[f"{PREFIX}{name}.lora_magnitude_vector"])
    return model

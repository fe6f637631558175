"""The one list of the zoo's architecture families: family name -> package, and the Hugging Face
`model_type`s that package loads.

Everything that has to find an architecture by name reads this table: `from_pretrained` below
(dispatch on a checkpoint's config.json), `inference.memory`, `inference.benchmarks.throughput` and
`training.benchmarks.throughput`. Adding a family is one line here plus its folder; no shared file spells
a family's name anywhere else.

Every package named here has the face of the zoo's contract (shared/GUIDE.md): `PRESETS`,
`preset(name)`, `from_pretrained(path, dtype, device)`, `save_pretrained(model, path)`, the model
class named below, and a `flops` module with `flops_per_token(cfg, seq_len)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch


@dataclass(frozen=True)
class Family:
    package: str  # the Python package under architectures/
    model_class: str  # the name of its causal-LM class in that package
    model_types: tuple[str, ...]  # the `model_type`s of Hugging Face config.json files it loads


FAMILIES: dict[str, Family] = {
    "llama3": Family("architectures.llama3", "Llama3", ("llama",)),
    "mixtral": Family("architectures.mixtral", "Mixtral", ("mixtral",)),
    "deepseek_v3": Family("architectures.deepseek_v3", "DeepseekV3", ("deepseek_v3", "kimi_k2")),
    "mamba2_hybrid": Family("architectures.mamba2_hybrid", "Mamba2Hybrid", ("mamba2", "nemotron_h")),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown architecture family {name!r}; the registered ones are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def package(name: str) -> ModuleType:
    """The family's package, imported on first use (so listing families imports no model code)."""
    return importlib.import_module(family(name).package)


def model_class(name: str) -> type:
    return getattr(package(name), family(name).model_class)


def flops_per_token(name: str):
    return importlib.import_module(f"{family(name).package}.flops").flops_per_token


def family_for_model_type(model_type: str | None) -> str | None:
    """The family that loads config.json files with this `model_type`, or None."""
    return next((n for n, f in FAMILIES.items() if model_type in f.model_types), None)


def loader_hint(model_type: str | None) -> str:
    """'load it with architectures.mixtral', or the list of what the zoo loads."""
    name = family_for_model_type(model_type)
    if name is not None:
        return f"load it with {FAMILIES[name].package}"
    known = ", ".join(f"{t!r} ({f.package})" for f in FAMILIES.values() for t in f.model_types)
    return f"the zoo loads model_type {known}"


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load any Hugging Face-format checkpoint the zoo has an architecture for, by its config.json."""
    from architectures.common.checkpoint import read_config_json

    model_type = read_config_json(path).get("model_type")
    name = family_for_model_type(model_type)
    if name is None:
        raise ValueError(f"{path}/config.json has model_type={model_type!r}, which no zoo architecture loads; "
                         f"{loader_hint(model_type)}")
    return package(name).from_pretrained(path, dtype=dtype, device=device)


def family_of(model: torch.nn.Module) -> str:
    """The family name of a zoo model (to save it with its family's `save_pretrained`)."""
    for name in FAMILIES:
        if isinstance(model, model_class(name)):
            return name
    raise ValueError(f"{type(model).__name__} is not a model of any zoo family ({', '.join(FAMILIES)})")

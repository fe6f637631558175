"""The one list of the zoo's architecture families, each with its whole contract.

Everything that has to find an architecture by name reads this table: `from_pretrained` below
(dispatch on a checkpoint's config.json), `python -m inference.generate`, `inference.memory`, the
benchmarks, the shared training command line (training/cli.py) and every post-training method.
Adding a family is its folder plus one entry here; no shared file spells a family's name anywhere
else. notes/contributing.md walks through adding one.

A `Family` declares what the rest of the zoo relies on:
- `model_class`: the causal LM; `model(input_ids)` (B, T) -> logits (B, T, V), with the hidden
  states and the head as separate calls (`hidden_states`, `compute_logits`);
- `config`: its config module, with `PRESETS`, `preset(name)` and the config dataclass;
- `from_pretrained(path, dtype, device)` / `save_pretrained(model, path)`: Hugging Face-format
  checkpoint directories; `model_types`: the config.json `model_type`s it loads;
- `flops_per_token(cfg, seq_len)`: training FLOPs per token, for MFU;
- `loss(model, batch) -> (loss, metrics)`: the pretraining objective, auxiliary terms included;
- `aux_loss(model) -> (terms or None, metrics)`: those auxiliary terms alone, read from the forward
  pass just run, which a post-training method adds to its own loss;
- `on_step(step, model)`: the hook the loop calls after every optimizer step (a router's bias
  update), or None;
- `kind`: what the family is. "causal_lm" (the default) is everything above. "diffusion"
  (Stable Diffusion) is a pipeline of models, not a causal LM: its `model_class` builds from a
  preset with `from_config(cfg)`, its checkpoints are diffusers-format directories found by
  model_index.json's `_class_name` (its `model_types`), its `loss` is the denoising objective and it
  has no FLOPs-per-token. The tools that only make sense for a language model (inference.generate,
  inference.memory, the LM training command line, the post-training methods' --base) accept only
  `LM_KIND` families and refuse the others in one line (`require_lm`, and `from_pretrained`'s `kind`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from architectures import deepseek_v3, gemma, llama3, mamba2_hybrid, mixtral, stable_diffusion
from architectures.common.checkpoint import read_config_json
from architectures.common.loss import lm_loss
from architectures.deepseek_v3 import config as deepseek_v3_config
from architectures.deepseek_v3.flops import flops_per_token as deepseek_v3_flops
from architectures.deepseek_v3.losses import bias_update_step, deepseek_aux_loss, deepseek_lm_loss
from architectures.gemma import config as gemma_config
from architectures.gemma.flops import flops_per_token as gemma_flops
from architectures.llama3 import config as llama3_config
from architectures.llama3.flops import flops_per_token as llama3_flops
from architectures.mamba2_hybrid import config as mamba2_hybrid_config
from architectures.mamba2_hybrid.flops import flops_per_token as mamba2_hybrid_flops
from architectures.mixtral import config as mixtral_config
from architectures.mixtral.flops import flops_per_token as mixtral_flops
from architectures.mixtral.losses import moe_aux_loss, moe_lm_loss
from architectures.stable_diffusion import config as stable_diffusion_config
from architectures.stable_diffusion.losses import diffusion_loss
from architectures.stable_diffusion.pretrained import INDEX as PIPELINE_INDEX

Loss = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Family:
    package: str  # the Python package under architectures/
    model_class: type  # its causal-LM class
    config: ModuleType  # its config module: PRESETS, preset(name), the config dataclass
    model_types: tuple[str, ...]  # the `model_type`s of Hugging Face config.json files it loads
    from_pretrained: Callable  # (path, dtype=torch.float32, device="cpu") -> the model, in eval mode
    save_pretrained: Callable  # (model, path, state_dict=None): config.json + model.safetensors
    flops_per_token: Callable | None  # (cfg, seq_len) -> training FLOPs per token (None: not a token model)
    loss: Loss = lm_loss  # the pretraining objective, auxiliary terms included
    aux_loss: Callable | None = None  # model -> (auxiliary terms of the last forward or None, metrics)
    on_step: Callable | None = None  # (step, model) after every optimizer step
    loss_label: str = "train loss"  # the loss's name in the terminal
    kind: str = "causal_lm"  # "causal_lm" or "diffusion" (module docstring)
    usage: str = ""  # for a family that is not a causal LM: the command that uses its checkpoints


FAMILIES: dict[str, Family] = {
    "llama3": Family("architectures.llama3", llama3.Llama3, llama3_config, ("llama",),
                     llama3.from_pretrained, llama3.save_pretrained, llama3_flops),
    "mixtral": Family("architectures.mixtral", mixtral.Mixtral, mixtral_config, ("mixtral",),
                      mixtral.from_pretrained, mixtral.save_pretrained, mixtral_flops,
                      loss=moe_lm_loss, aux_loss=moe_aux_loss, loss_label="train loss (lm + aux)"),
    "deepseek_v3": Family("architectures.deepseek_v3", deepseek_v3.DeepseekV3, deepseek_v3_config,
                          ("deepseek_v3", "kimi_k2"), deepseek_v3.from_pretrained, deepseek_v3.save_pretrained,
                          deepseek_v3_flops, loss=deepseek_lm_loss, aux_loss=deepseek_aux_loss,
                          on_step=bias_update_step),
    "mamba2_hybrid": Family("architectures.mamba2_hybrid", mamba2_hybrid.Mamba2Hybrid, mamba2_hybrid_config,
                            ("mamba2", "nemotron_h"), mamba2_hybrid.from_pretrained, mamba2_hybrid.save_pretrained,
                            mamba2_hybrid_flops, on_step=bias_update_step),
    "gemma": Family("architectures.gemma", gemma.Gemma, gemma_config, ("gemma3_text", "gemma2", "gemma3"),
                    gemma.from_pretrained, gemma.save_pretrained, gemma_flops),
    "stable_diffusion": Family("architectures.stable_diffusion", stable_diffusion.StableDiffusion,
                               stable_diffusion_config, ("StableDiffusionPipeline",), stable_diffusion.from_pretrained,
                               stable_diffusion.save_pretrained, None, loss=diffusion_loss,
                               loss_label="train loss (noise MSE)", kind="diffusion",
                               usage="python -m architectures.stable_diffusion.sample --checkpoint DIR --prompt TEXT"),
}

LM_KIND = "causal_lm"

# The family and preset of the README's quick start, which is also every post-training method's
# default base model (trained on first use when no --base is given).
QUICK_START_FAMILY = "llama3"


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown architecture family {name!r}; the registered ones are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def language_models() -> list[str]:
    """The families that are causal language models, the only ones the LM tools take."""
    return [n for n, f in FAMILIES.items() if f.kind == LM_KIND]


def require_lm(name: str, what: str) -> Family:
    """The family `name`, refused in one line unless it is a causal language model (`what`: the tool)."""
    f = family(name)
    if f.kind != LM_KIND:
        raise ValueError(f"{what} takes a causal language model; {name} is a {f.kind} family"
                         + (f" (use it with {f.usage})" if f.usage else "")
                         + f"; the language-model families are {', '.join(language_models())}")
    return f


def package(name: str) -> ModuleType:
    """The family's package (`architectures.<name>`), imported above like every family."""
    return importlib.import_module(family(name).package)


def model_class(name: str) -> type:
    return family(name).model_class


def flops_per_token(name: str) -> Callable:
    return family(name).flops_per_token


def family_for_model_type(model_type: str | None) -> str | None:
    """The family that loads config.json files with this `model_type`, or None."""
    return next((n for n, f in FAMILIES.items() if model_type in f.model_types), None)


def loader_hint(model_type: str | None) -> str:
    """'load it with architectures.mixtral', or the list of what the zoo loads."""
    name = family_for_model_type(model_type)
    if name is not None:
        return f"load it with {FAMILIES[name].package}"
    # config.json model_types are language models'; a diffusion family's model_types are pipeline class names
    known = ", ".join(f"{t!r} ({f.package})" for f in FAMILIES.values() if f.kind == LM_KIND for t in f.model_types)
    return f"the zoo loads model_type {known}"


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    kind: str | None = LM_KIND):
    """Load any checkpoint the zoo has an architecture for: a Hugging Face-format directory by its
    config.json's model_type, a diffusers pipeline by its model_index.json. `kind`: the only kind of
    family the caller can use (a language model, by default: every LM tool calls this), or None for any."""
    index = Path(path) / PIPELINE_INDEX
    if index.is_file() and not (Path(path) / "config.json").is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{index} is not valid JSON ({e}); the file is corrupted or truncated") from e
        name = family_for_model_type(class_name)
        if name is None:
            raise ValueError(f"{path} is a diffusers pipeline of class {class_name!r}, which no zoo architecture loads")
        if kind is not None and FAMILIES[name].kind != kind:
            raise ValueError(f"{path} is a {class_name} ({FAMILIES[name].kind}), not a causal language model, so it "
                             f"cannot be used here; use it with {FAMILIES[name].usage.replace('DIR', str(path))}")
        return FAMILIES[name].from_pretrained(path, dtype=dtype, device=device)
    model_type = read_config_json(path).get("model_type")
    name = family_for_model_type(model_type)
    if name is None:
        raise ValueError(f"{path}/config.json has model_type={model_type!r}, which no zoo architecture loads; "
                         f"{loader_hint(model_type)}")
    return FAMILIES[name].from_pretrained(path, dtype=dtype, device=device)


def family_of(model: torch.nn.Module) -> str:
    """The family name of a zoo model (to save it with its family's `save_pretrained`)."""
    for name, f in FAMILIES.items():
        if type(model) is f.model_class:
            return name
    for name, f in FAMILIES.items():
        if isinstance(model, f.model_class):
            return name
    raise ValueError(f"{type(model).__name__} is not a model of any zoo family ({', '.join(FAMILIES)})")

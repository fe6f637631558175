"""Reading and writing diffusers-format pipeline directories.

    DIR/model_index.json                      which component class sits in which folder
    DIR/unet/config.json + diffusion_pytorch_model.safetensors
    DIR/vae/config.json + diffusion_pytorch_model.safetensors
    DIR/text_encoder/config.json + model.safetensors          (transformers' CLIPTextModel)
    DIR/tokenizer/                                             (architectures/stable_diffusion/tokenizer.py)
    DIR/scheduler/scheduler_config.json

Tensor names are the reference's, so loading is a strict name-for-name copy that names any
missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from architectures.common.checkpoint import load_state_dict_strict
from architectures.stable_diffusion.tokenizer import from_pretrained as tokenizer_from_pretrained
from architectures.stable_diffusion.config import (
    VAE_DOWN, VAE_UP, scheduler_from_dict, text_from_dict, to_dict, unet_from_dict, vae_from_dict)
from architectures.stable_diffusion.pipeline import StableDiffusion
from architectures.stable_diffusion.text_encoder import CLIPTextModel
from architectures.stable_diffusion.unet import UNet2DConditionModel
from architectures.stable_diffusion.vae import AutoencoderKL
from architectures.utils.files import atomic_write, atomic_write_json

INDEX = "model_index.json"
PIPELINE_CLASS = "StableDiffusionPipeline"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model.safetensors", "model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the version whose layout this writes and is tested against


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupted or truncated") from e


def check_pipeline_dir(path: Path) -> dict:
    """The pipeline's model_index.json, once every component folder it needs is known to be there."""
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline directory {path} does not exist")
    if not (path / INDEX).is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory: it has no {INDEX} "
                                f"(found: {sorted(p.name for p in path.iterdir())})")
    index = read_json(path / INDEX)
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{path / INDEX} describes a {index.get('_class_name')!r}, not a {PIPELINE_CLASS}")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"the pipeline in {path} is missing its {', '.join(m + '/' for m in missing)} "
                                f"folder{'s' if len(missing) > 1 else ''}; a Stable Diffusion pipeline needs "
                                f"{', '.join(c + '/' for c in COMPONENTS)}")
    return index


def load_component(cls, cfg, folder: Path, weights: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """`cls(cfg)` filled with folder/weights, name for name (built on the meta device: no random init)."""
    file = folder / weights
    if not file.is_file():
        others = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder} has no {weights} (found: {others}); only safetensors weights are read")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"cannot read {file}: {e}. The file is truncated or corrupted; save it again") from e
    state.pop("text_model.embeddings.position_ids", None)  # a buffer some transformers versions save
    if cls is CLIPTextModel and not any(k.startswith("text_model.") for k in state):
        # transformers 5 writes CLIPTextModel's tensors without the "text_model." prefix the published files have
        state = {"text_model." + k: v for k, v in state.items()}
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, state, where=str(folder))
    return model.to(device=device, dtype=dtype).eval()


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers-format Stable Diffusion directory -> `StableDiffusion` (unet, vae, text_encoder,
    tokenizer, scheduler), in eval mode."""
    path = Path(path)
    check_pipeline_dir(path)
    configs = {}
    for name, reader, file in (("unet", unet_from_dict, "config.json"), ("vae", vae_from_dict, "config.json"),
                               ("text_encoder", text_from_dict, "config.json"),
                               ("scheduler", scheduler_from_dict, "scheduler_config.json")):
        where = path / name / file
        if not where.is_file():
            raise FileNotFoundError(f"{path / name} has no {file}")
        configs[name] = reader(read_json(where), str(where))
    unet = load_component(UNet2DConditionModel, configs["unet"], path / "unet", DIFFUSERS_WEIGHTS, dtype, device)
    vae = load_component(AutoencoderKL, configs["vae"], path / "vae", DIFFUSERS_WEIGHTS, dtype, device)
    text = load_component(CLIPTextModel, configs["text_encoder"], path / "text_encoder", TRANSFORMERS_WEIGHTS, dtype,
                          device)
    return StableDiffusion(unet, vae, text, tokenizer_from_pretrained(path / "tokenizer"), configs["scheduler"]).eval()


def save_weights(module: torch.nn.Module, file: Path, state: dict | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else module.state_dict()).items()}
    atomic_write(file, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def vae_config_dict(vae: AutoencoderKL) -> dict:
    n = len(vae.config.block_out_channels)
    return to_dict(vae.config, _class_name="AutoencoderKL", _diffusers_version=DIFFUSERS_VERSION, act_fn="silu",
                   down_block_types=[VAE_DOWN] * n, up_block_types=[VAE_UP] * n)


def save_vae(vae: AutoencoderKL, path: str | Path, state_dict: dict | None = None) -> None:
    """The VAE alone, as a pipeline's vae/ folder (what the train script's first stage checkpoints)."""
    atomic_write_json(Path(path) / "config.json", vae_config_dict(vae))
    save_weights(vae, Path(path) / DIFFUSERS_WEIGHTS, state_dict)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> AutoencoderKL:
    path = Path(path)
    cfg = vae_from_dict(read_json(path / "config.json"), str(path / "config.json"))
    return load_component(AutoencoderKL, cfg, path, DIFFUSERS_WEIGHTS, dtype, device)


def save_pretrained(pipe: StableDiffusion, path: str | Path, state_dict: dict | None = None) -> None:
    """Write the pipeline in diffusers' layout (loadable by diffusers' StableDiffusionPipeline too).
    `state_dict`: the whole module's, as the training loop passes it (else the pipeline's own)."""
    path = Path(path)
    state = state_dict if state_dict is not None else pipe.state_dict()
    part = lambda prefix: {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}  # noqa: E731
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    unet_cfg = to_dict(pipe.unet.config, _class_name="UNet2DConditionModel", **version, act_fn="silu",
                       mid_block_type="UNetMidBlock2DCrossAttn")
    vae_cfg = vae_config_dict(pipe.vae)
    text_cfg = to_dict(pipe.text_encoder.config, architectures=["CLIPTextModel"], model_type="clip_text_model",
                       pad_token_id=pipe.tokenizer.pad_token_id, projection_dim=pipe.text_encoder.config.hidden_size)
    for name, cfg, weights in (("unet", unet_cfg, DIFFUSERS_WEIGHTS), ("vae", vae_cfg, DIFFUSERS_WEIGHTS),
                               ("text_encoder", text_cfg, TRANSFORMERS_WEIGHTS)):
        atomic_write_json(path / name / "config.json", cfg)
        save_weights(getattr(pipe, name), path / name / weights, part(name))
    pipe.tokenizer.save_pretrained(path / "tokenizer")
    atomic_write_json(path / "scheduler" / "scheduler_config.json",
                      to_dict(pipe.scheduler.config, _class_name="DDIMScheduler", **version))
    atomic_write_json(path / INDEX, {
        "_class_name": PIPELINE_CLASS, **version, "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False})

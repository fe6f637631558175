"""A checkpoint folder, checked before anything is loaded, and what its training run left beside it.

The inference commands take a folder on the command line (`--checkpoint DIR`, `--adapter DIR`).
`check_checkpoint` refuses a folder that cannot be loaded before any work starts, with one message
that names what is wrong: the folder does not exist or is a file, it is a LoRA adapter and not a
model, config.json or tokenizer.json is missing, or a weights file is missing, truncated or
corrupt (each safetensors header is opened, which checks that the file covers every tensor the
header lists, without reading the tensors).

A folder written by the zoo's training loop also holds what the run recorded, in
`trainer_state.pt` (training/checkpointing.py's STATE_FILE): its "record" is the run's configs.
"train" is the loop's TrainConfig (its block_size is the context the model was trained on), and a
chat method (SFT, LoRA, DPO, GRPO) adds "chat_format", the format it trained the model to answer
in. It is read here by file name, without importing training/ (inference sits below it), and
`tests/inference/test_generate_chat.py` checks the reading against training's own `read_record`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from architectures.common.checkpoint import read_config_json, weight_map
from architectures.utils.command_line import one_line

STATE_FILE = "trainer_state.pt"  # training/checkpointing.py
ADAPTER_CONFIG = "adapter_config.json"  # training/lora/peft_format.py, and PEFT's
TOKENIZER_FILE = "tokenizer.json"

def check_checkpoint(path: str | Path, flag: str = "--checkpoint", why_tokenizer: str | None = None,
                     adapter_hint: str = "load it with python -m inference.generate --adapter DIR") -> Path:
    """`path` as a Path, once it is a folder a model loads from: config.json, the weights (whole,
    every safetensors header readable) and, where `why_tokenizer` says why it is needed, tokenizer.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist; pass a checkpoint directory (config.json, "
                                f"model.safetensors, tokenizer.json), such as the --out folder of a train script")
    if not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file; pass the directory that holds config.json and the weights")
    if not (path / "config.json").is_file() and (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{flag} {path} holds a LoRA adapter ({ADAPTER_CONFIG}), not a whole model; {adapter_hint}")
    read_config_json(path)  # present and valid JSON, or an error that says which
    if why_tokenizer and not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{flag} {path} has no {TOKENIZER_FILE}; {why_tokenizer}")
    check_weights(path)
    return path


def check_weights(path: Path) -> None:
    """Open every weights file's header: a truncated or corrupt file fails here, named, before any loading."""
    for file in weight_map(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors' Rust side raises its own error types
            raise ValueError(f"the weights file {file} is truncated or corrupt ({one_line(e)}); save or download "
                             f"the checkpoint again") from e


# ---- what the training run recorded ----------------------------------------------------------------


def training_record(path: str | Path) -> dict | None:
    """The configs the run that wrote `path` recorded (its trainer_state.pt's "record"), or None for a
    folder no zoo training run wrote (a Hugging Face download, a copy of the model files alone)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a half-written or foreign file: the model files beside it may still be fine
        raise ValueError(f"{file} cannot be read ({one_line(e)}); it is truncated or corrupt. Move it away to use "
                         f"the model files beside it without their training record") from e
    record = state.get("record") if isinstance(state, dict) else None
    return record if isinstance(record, dict) else None


def trained_block_size(path: str | Path) -> int | None:
    """The block size (tokens per training row) the run that wrote `path` trained with, or None."""
    record = training_record(path) or {}
    size = (record.get("train") or {}).get("block_size")
    return size if isinstance(size, int) and size > 0 else None


def recorded_chat_format(path: str | Path) -> str | None:
    """The chat format ("zoo", "llama3") a chat method (training.sft, lora, dpo, grpo) trained the model
    in, as its training record names it ("chat_format"); None for any other folder (pretraining,
    distillation, a download), which `generate` then prompts with plain text."""
    name = (training_record(path) or {}).get("chat_format")
    return name if isinstance(name, str) else None


# ---- a LoRA adapter folder -------------------------------------------------------------------------


def check_adapter(path: str | Path, flag: str = "--adapter") -> Path:
    """`path` as a Path, once it is a folder holding adapter_config.json (training/lora/peft_format.py
    checks the rest as it loads the adapter)."""
    path = Path(path)
    wrote = f"the folder training.lora.train (or PEFT's save_pretrained) wrote: {ADAPTER_CONFIG} + adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist; pass {wrote}")
    if not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file; pass {wrote}")
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / "config.json").is_file():
            raise ValueError(f"{flag} {path} is a whole model (config.json), not a LoRA adapter; pass it as --checkpoint")
        raise ValueError(f"{flag} {path} is not a LoRA adapter: it has no {ADAPTER_CONFIG} (found: "
                         f"{sorted(p.name for p in path.iterdir())}); pass {wrote}")
    return path


def adapter_base(adapter: Path) -> Path:
    """The base model an adapter records (adapter_config.json's base_model_name_or_path), as a local folder."""
    file = adapter / ADAPTER_CONFIG
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({one_line(e)}); the file is truncated or corrupt") from e
    base = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if not base:
        raise ValueError(f"--adapter {adapter} records no base model ({ADAPTER_CONFIG} has no "
                         f"base_model_name_or_path); pass the model it was trained on as --checkpoint DIR")
    if not Path(base).is_dir():
        raise FileNotFoundError(f"--adapter {adapter} was trained on {base!r}, which is not a local directory here; "
                                f"pass the model it was trained on as --checkpoint DIR")
    return Path(base)

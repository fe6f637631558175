"""A checkpoint folder, checked before anything is loaded, and what its training run left beside it.

The inference commands take a folder on the command line (`--checkpoint DIR`, `--adapter DIR`).
`check_checkpoint` refuses a folder that cannot be loaded before any work starts, with one message
that names what is wrong: the folder does not exist or is a file, it is a LoRA adapter and not a
model, config.json or tokenizer.json is missing, or a weights file is missing, truncated or
corrupt (each safetensors header is opened, which checks that the file covers every tensor the
header lists, without reading the tensors).

A folder written by the zoo's training loop also holds what the run recorded:
- `trainer_state.pt` (training/checkpointing.py's STATE_FILE), whose "record" is the run's
  configs: "train" is the loop's TrainConfig (its block_size is the context the model was trained
  on), and a post-training method adds "method", the method's own options;
- `summary.json`, the run's final figures (training/posttrain.py's `write_summary` for the methods,
  training/cli.py's `final_report` for pretraining).
They are read here by file name, without importing training/ (inference sits below it), and
`tests/inference/test_generate_chat.py` checks the reading against training's own `read_record`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from architectures.common.checkpoint import INDEX_FILE, SINGLE_FILE, read_config_json
from architectures.utils.command_line import one_line

STATE_FILE = "trainer_state.pt"  # training/checkpointing.py
SUMMARY_FILE = "summary.json"  # training/posttrain.py, training/cli.py
ADAPTER_CONFIG = "adapter_config.json"  # training/lora/peft_format.py, and PEFT's
TOKENIZER_FILE = "tokenizer.json"

# The methods that train a model to answer in a chat format (training/chat.py), and how each one's
# options in the training record tell it apart: the fields of its config dataclass that no other
# method's has (training/{dpo,grpo}/train.py, training/lora/recipes.py, training/sft/recipes.py).
CHAT_METHODS = (("training.dpo", {"beta", "loss_type"}), ("training.grpo", {"group_size", "kl_coef"}),
                ("training.lora", {"r", "target_modules", "chat_format"}), ("training.sft", {"pack", "chat_format"}))
# Without a training record, summary.json tells: the chat methods alone score held-out questions
# asked in the chat format ("exact_match_after"); the first key of this list found names the method.
SUMMARY_SIGNS = (("preference_accuracy", "training.dpo"), ("trainable_parameters", "training.lora"),
                 ("val_loss", "training.sft"), ("exact_match_after", "training.grpo"))


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


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: model.safetensors, or the shards its index lists."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (it needs a 'weight_map'); the file is "
                             f"truncated or corrupt: {one_line(e)}") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard file(s) {missing} listed in {INDEX_FILE} are missing")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"{path} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE} (found: "
                            f"{sorted(p.name for p in path.iterdir())})")


def check_weights(path: Path) -> None:
    """Open every weights file's header: a truncated or corrupt file fails here, named, before any loading."""
    for file in weight_files(path):
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


def training_summary(path: str | Path) -> dict | None:
    """summary.json of the run that wrote `path`, or None if there is none (or it is not a JSON object)."""
    file = Path(path) / SUMMARY_FILE
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def trained_block_size(path: str | Path) -> int | None:
    """The block size (tokens per training row) the run that wrote `path` trained with, or None."""
    record = training_record(path) or {}
    size = (record.get("train") or {}).get("block_size")
    return size if isinstance(size, int) and size > 0 else None


def chat_method(path: str | Path) -> str | None:
    """"training.sft", "training.lora", "training.dpo" or "training.grpo" when one of the chat methods
    wrote `path` (a model or an adapter folder), read from its training record, else its summary.json;
    None for anything else (pretraining, distillation, a download)."""
    record = training_record(path)
    if record is not None and "method" in record:
        method = record["method"]
        fields = set(method) if isinstance(method, dict) else set()
        return next((name for name, signs in CHAT_METHODS if signs <= fields), None)
    summary = training_summary(path) or {}
    if "exact_match_after" not in summary:
        return None
    return next(name for key, name in SUMMARY_SIGNS if key in summary)


def recorded_chat_format(path: str | Path) -> str | None:
    """The chat format a run was told to use ("zoo", "llama3"), or None for the tokenizer's own ("auto")."""
    method = (training_record(path) or {}).get("method")
    name = method.get("chat_format") if isinstance(method, dict) else None
    return name if isinstance(name, str) and name != "auto" else None


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

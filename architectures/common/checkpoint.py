"""Reading and writing Hugging Face-format checkpoint directories, with errors that say what is wrong.

The layout published on the hub: `config.json` plus either one `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`
(`{"weight_map": {tensor name: shard file}}`). Every architecture's `from_pretrained` is
`read_config_json` + its own config mapping + `load_state_dict_strict(model, load_weights(dir))`.
Writes are atomic (temporary file, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from architectures.utils.files import atomic_write

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def check_model_type(d: dict, expected: str, where: str) -> None:
    """Refuse a config.json written for another architecture, and say how to load it: the registry
    (`architectures.registry.from_pretrained`, `python -m inference.generate`) picks the family from
    config.json's model_type, so only a family's own loader can be handed the wrong directory."""
    model_type = d.get("model_type")
    if model_type != expected:
        archs = ", ".join(d.get("architectures") or [])
        raise ValueError(
            f"{where} describes model_type={model_type!r}{f' ({archs})' if archs else ''}, not a {expected!r} model; "
            f"load it with architectures.registry.from_pretrained, which picks the family from its model_type"
        )


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = path / "config.json"
    if not cfg.is_file() and (path / "model_index.json").is_file():
        raise ValueError(f"{path} is a diffusers pipeline (it has model_index.json, no config.json), not a causal "
                         f"language model checkpoint; architectures.registry.from_pretrained(path, kind=None) loads it, "
                         f"and its family's commands sample it")
    if not cfg.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; a Hugging Face-format checkpoint needs config.json "
            f"next to its *.safetensors (found: {sorted(p.name for p in path.iterdir())})"
        )
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}); the file is corrupted or truncated") from e


def _read_safetensors(file: Path, names=None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"cannot read {file}: {e}. The file is truncated or corrupted; download or save it again"
        ) from e


def weight_map(path: str | Path) -> dict[Path, list[str] | None]:
    """The safetensors files of a checkpoint directory, each with the tensor names to read from it:
    the shards its index lists, or model.safetensors whole (None: every tensor in it)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
            by_shard: dict[str, list[str]] = {}
            for name, shard in names.items():
                by_shard.setdefault(shard, []).append(name)
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        missing = sorted(s for s in by_shard if not (path / s).is_file())
        if missing:
            raise FileNotFoundError(f"{path}: shard file(s) {missing} listed in {INDEX_FILE} are missing")
        return {path / shard: tensors for shard, tensors in sorted(by_shard.items())}
    single = path / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(
        f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
        f"found: {sorted(p.name for p in path.iterdir())}"
    )


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from one safetensors file or a sharded index."""
    state: dict[str, torch.Tensor] = {}
    for file, names in weight_map(path).items():
        state.update(_read_safetensors(file, names))
    return state


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`, naming every missing, unexpected or mis-shaped tensor.

    A tied output head (lm_head.weight is embed_tokens.weight) may be absent from the file,
    as transformers writes it; if present it is ignored, as transformers ignores it.
    """
    expected = model.state_dict()
    head = expected.get("lm_head.weight")
    tied = {"lm_head.weight"} if head is not None and any(
        n != "lm_head.weight" and p.data_ptr() == head.data_ptr() for n, p in expected.items()) else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{n}: checkpoint {tuple(state[n].shape)} vs model {tuple(expected[n].shape)}"
        for n in set(state) & set(expected) if state[n].shape != expected[n].shape
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if wrong_shape:
            parts.append(f"shape mismatches {wrong_shape}")
        raise ValueError(f"{where}: weights do not match config.json: " + "; ".join(parts))
    with torch.no_grad():
        for name, tensor in expected.items():
            if name in state and name not in tied:
                tensor.copy_(state[name])


def materialize(model, device):
    """A model built on the meta device, allocated (uninitialised) on `device`, with the buffers derived
    from its config recomputed (`reset_buffers`) and a tied head re-made: ready for load_state_dict."""
    model = model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
    model.tie_weights()
    return model


def build_and_load(cfg, model_cls, path: str | Path, dtype: torch.dtype, device,
                   convert: Callable[[dict], dict] = lambda state: state) -> torch.nn.Module:
    """Build `model_cls(cfg)` without initialising it and fill it with the tensors in `path`.

    Every family's `from_pretrained` ends here; `convert` maps the file's tensor names and layout
    to the model's (Mixtral's per-expert hub layout to its fused experts, say)."""
    # Build on the meta device (no memory, no random init: every weight is overwritten below),
    # then allocate. Buffers derived from the config (RoPE tables) are recomputed by the modules
    # that own them (`reset_buffers`), and a tied head is re-made by hand.
    with torch.device("meta"):
        model = model_cls(cfg)
    model = materialize(model, device)
    load_state_dict_strict(model, convert(load_weights(path)), where=str(path))
    return model.to(dtype=dtype).eval()


def save_weights(model: torch.nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write model.safetensors atomically, storing a tied head once (as transformers does).

    `state_dict` replaces model.state_dict() when given (FSDP2 passes the gathered full one)."""
    state = dict(state_dict if state_dict is not None else model.state_dict())
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(Path(path) / SINGLE_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))

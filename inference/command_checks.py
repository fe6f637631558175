"""Checks the inference command lines share, made before any work starts: a family's presets,
numbers, an output folder. Each failure is a ValueError (or NotADirectoryError) whose message names
the option and says what would work, which `command_line` prints as one `error: ...` line. Also the
engine options of the serving commands (`python -m inference.serve`, the serving load test):
`add_engine_options` and the `EngineConfig` they make (`engine_config`)."""

from __future__ import annotations

import math
from pathlib import Path

from architectures import registry
from architectures.utils.device import add_device_option, add_dtype_option
from inference.engine import EngineConfig
from inference.quantized_kv import valid_kv_dtypes

# The presets every family has for training from scratch (its train.py's recipes); the others are the
# shapes of published models, which is what a memory or speed figure is usually wanted for.
TRAINING_PRESETS = ("tiny", "shakespeare")


def family_presets(family: str) -> list[str]:
    """The presets of a family's config module (`registry.family(name).config.PRESETS`), in its order."""
    return list(registry.family(family).config.PRESETS)


def presets_help() -> str:
    """Every family's presets, for an option's --help: 'llama3: tiny, shakespeare, ...; mixtral: ...'."""
    return "; ".join(f"{name}: {', '.join(family_presets(name))}" for name in registry.language_models())


def default_preset(family: str, preferred: str) -> str:
    """`preferred` if the family has it, else the family's first published shape (its first preset
    after the training ones), so that `--family X` alone always names a preset X has."""
    presets = family_presets(family)
    if preferred in presets:
        return preferred
    published = [p for p in presets if p not in TRAINING_PRESETS]
    return (published or presets)[0]


def check_preset(family: str, preset: str, flag: str = "--preset") -> None:
    presets = family_presets(family)
    if preset not in presets:
        raise ValueError(f"{flag} {preset!r} is not a {family} preset; {family}'s presets are {', '.join(presets)}")


def check_at_least(*checks: tuple[str, int | float, int | float]) -> None:
    """Each (flag, value, least): the value must be at least `least` (a number argparse already parsed)."""
    for flag, value, least in checks:
        if not value >= least:  # `not >=`: a nan is refused too
            raise ValueError(f"{flag} must be >= {least}, got {value}")


def check_positive(flag: str, value: float) -> None:
    """A float option that must be a finite number above 0 (argparse's float() takes 'nan' and 'inf')."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} must be a finite number > 0, got {value}")


def check_out_dir(flag: str, path: str | Path | None) -> None:
    """An output folder that may not exist yet, but must not be a file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file; pass a directory (it is created if missing)")


def add_engine_options(p) -> None:
    """--max-num-seqs, --num-blocks, --kv-dtype, --device and --dtype on an ArgumentParser."""
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences in one forward pass at most (the batch continuous batching fills); more wait")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks of 16 tokens in the pool; default: half the free GPU memory, or 4096 on a CPU")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", *valid_kv_dtypes()],
                   help="how the KV cache stores keys and values (quantized int8/fp8/int4, or a plain dtype); "
                        "auto: the weights' dtype")
    add_device_option(p)
    add_dtype_option(p, help="weights' number format; auto: bf16 on a GPU, fp32 on the CPU")


def engine_config(args) -> EngineConfig:
    """The EngineConfig of `add_engine_options`' options, checked."""
    check_at_least(("--max-num-seqs", args.max_num_seqs, 1))
    if args.num_blocks is not None:
        check_at_least(("--num-blocks", args.num_blocks, 1))
    return EngineConfig(max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks,
                        max_num_batched_tokens=max(4096, args.max_num_seqs),
                        kv_dtype=None if args.kv_dtype == "auto" else args.kv_dtype)

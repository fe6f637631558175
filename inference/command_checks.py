"""Checks the inference command lines share, made before any work starts: a family's presets,
numbers, an output folder. Each failure is a ValueError (or NotADirectoryError) whose message names
the option and says what would work, which `command_line` prints as one `error: ...` line."""

from __future__ import annotations

import math
from pathlib import Path

from architectures import registry

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

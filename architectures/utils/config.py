"""Typed configs shared by every architecture: presets, overrides and JSON round-trips.

Every model config in the zoo is a dataclass with a comment on each field. This module
gives them the three things a command line and a checkpoint need, checked against the
dataclass's own field types so that a typo or a wrong type is an error that says what
to fix, never a silently ignored setting:

- `config_from_dict(cls, d)`: build a config from a dict (a preset, or a config.json),
  rejecting unknown fields and values of the wrong type;
- `apply_overrides(cfg, {"n_layers": "4"})`: `--key value` pairs from the command line,
  parsed to each field's type;
- `config_to_dict(cfg)`: the plain dict written next to a checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from architectures.utils.command_line import UserTypeError

C = TypeVar("C")

_NONE = type(None)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _allowed(tp) -> tuple:
    """The runtime types a field annotated `tp` accepts (unwrapping Optional / unions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out: tuple = ()
        for arg in typing.get_args(tp):
            out += _allowed(arg)
        return out
    if origin is not None:  # dict[str, float], list[int], tuple[...]
        return (origin,)
    return (tp,)


def check_value(name: str, value: Any, tp, where: str) -> Any:
    """Return `value` if it fits annotation `tp`; ints are accepted where floats are expected."""
    allowed = _allowed(tp)
    if value is None and _NONE in allowed:
        return None
    if isinstance(value, bool) and bool not in allowed:
        pass  # bool is a subclass of int: `n_layers=True` must not pass as 1
    elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, tuple(t for t in allowed if t is not _NONE)):
        return value
    names = " or ".join("None" if t is _NONE else t.__name__ for t in allowed)
    raise UserTypeError(f"{where}: field '{name}' must be {names}, got {type(value).__name__} {value!r}")


def config_from_dict(cls: type[C], d: dict[str, Any], where: str | None = None) -> C:
    """Build dataclass `cls` from `d`; unknown keys and wrongly typed values are errors."""
    where = where or cls.__name__
    types = _field_types(cls)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {unknown}; valid fields are {sorted(types)}"
        )
    checked = {k: check_value(k, v, types[k], where) for k, v in d.items()}
    return cls(**checked)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_value(name: str, text: str, tp, where: str) -> Any:
    """Parse a command-line string into the type of field `name`."""
    allowed = _allowed(tp)
    if text.lower() in ("none", "null") and _NONE in allowed:
        return None
    for t in allowed:
        if t is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
        elif t in (int, float, str):
            try:
                return t(text)
            except ValueError:
                continue
    names = " or ".join("None" if t is _NONE else t.__name__ for t in allowed)
    raise UserTypeError(f"{where}: --{name.replace('_', '-')} expects {names}, got {text!r}")


def apply_overrides(cfg: C, overrides: dict[str, str], where: str | None = None) -> C:
    """Return a copy of `cfg` with `--key value` strings parsed to the fields' types."""
    where = where or type(cfg).__name__
    types = _field_types(type(cfg))
    changes = {}
    for key, text in overrides.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ValueError(
                f"{where}: unknown option --{key}; valid options are "
                + ", ".join("--" + n.replace("_", "-") for n in sorted(types))
            )
        changes[name] = parse_value(name, text, types[name], where)
    return dataclasses.replace(cfg, **changes)


def get_preset(presets: dict[str, C], name: str, family: str) -> C:
    if name not in presets:
        raise ValueError(f"unknown {family} preset '{name}'; choose one of {sorted(presets)}")
    return presets[name]

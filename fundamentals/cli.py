"""The command line every fundamentals script shares: a preset, one option per field, an output folder.

    python -m fundamentals.<part>.train [--preset P] [--out DIR] [--overwrite] [--FIELD VALUE ...]

A preset is a dataclass of defaults (each script's PRESETS). Every field of it is an option,
parsed to the field's declared type by architectures.utils.config's `apply_overrides`, and
`--help` shows each one's type, the chosen preset's value, its valid range and, as its
meaning, the comment on its line of the dataclass (training.cli's `field_meanings`, as the
LLM scripts show theirs).

Everything is checked before any work starts, and each mistake ends the command with one
`error: ...` line (architectures.utils.command_line): an unknown preset or option, a value of
the wrong type, a number outside its range (`RANGES`: a count of 0, a learning rate of 0, nan
or inf), a value that is not one of a field's `CHOICES`, an --out that is a file, and an --out
that already holds a finished run's summary.json (`--overwrite` replaces it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import textwrap
import typing
from pathlib import Path

from architectures.utils.command_line import ArgumentParser, UserTypeError
from architectures.utils.config import apply_overrides
from training.checks import check_writable
from training.options import field_meanings, type_name


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a number field: finite, from `low` up to `high`, each end included unless open."""

    low: float
    high: float = math.inf
    low_open: bool = False  # True: `low` itself is not valid (a learning rate must be above 0)
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        low, high = (str(int(x)) if float(x).is_integer() else str(x) for x in (self.low, self.high))
        if self.high == math.inf:
            return f"above {low}" if self.low_open else f"at least {low}"
        if not (self.low_open or self.high_open):
            return f"between {low} and {high}"
        return f"{'above' if self.low_open else 'at least'} {low} and {'below' if self.high_open else 'at most'} {high}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, low_open=True)

# The ranges of the fields that several scripts have; a config adds its own in a `RANGES` class
# variable, and its fields with a fixed set of values in `CHOICES`. Every int and float field
# of every preset must have a range (tests/fundamentals/test_cli_errors.py checks it).
SHARED_RANGES = {
    "steps": AT_LEAST_1, "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "hidden": AT_LEAST_1,
    "embed": AT_LEAST_1, "layers": AT_LEAST_1, "threads": AT_LEAST_1, "warmup_steps": AT_LEAST_0,
    "lr": ABOVE_0, "weight_decay": AT_LEAST_0, "grad_clip": ABOVE_0,
    "seed": Range(0, 2**64 - 1),  # what torch.manual_seed accepts
}


def ranges(cls: type) -> dict[str, Range]:
    """The range of every number field of config class `cls` that has one."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: r for k, r in {**SHARED_RANGES, **getattr(cls, "RANGES", {})}.items() if k in names}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg) -> None:
    """Every number within its range and every choice one of its values, or a ValueError naming the option."""
    hints, valid = typing.get_type_hints(type(cfg)), ranges(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in valid and value not in valid[f.name]:
            kind = "a finite number " if hints[f.name] is float else ""
            raise ValueError(f"{flag(f.name)} must be {kind}{valid[f.name]}, got {value!r}")
        choices = getattr(type(cfg), "CHOICES", {}).get(f.name)
        if choices and value not in choices:
            raise ValueError(f"{flag(f.name)} {value!r} is not one of {', '.join(map(repr, choices))}")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is (or lies under) a file, one holding a finished run's summary.json unless
    `overwrite`, and one that cannot be written (the script creates the folder later)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest folder that exists: the script creates the rest
    if not existing.is_dir():
        what = f"--out {out} is a file" if existing == out else f"--out {out} lies under {existing}, a file"
        raise NotADirectoryError(f"{what}; pass a directory (it is created if missing)")
    if (out / "summary.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a finished run (summary.json); pass --overwrite to replace it, "
                              f"or choose another --out")
    check_writable(out)  # the zoo's one probe: it makes the folder, writes in it, and removes what it made


def default_out(prog: str, preset: str) -> str:
    """runs/fundamentals-cnn-resnet for `python -m fundamentals.cnn.train --preset resnet`."""
    part = prog.split()[-1].removeprefix("fundamentals.").removesuffix(".train").replace(".", "-")
    return f"runs/fundamentals-{part}-{preset}"


def describe_presets(presets: dict) -> str:
    """One line per preset: the fields in which it differs from the first."""
    first_name, first = next(iter(presets.items()))
    lines = [f"presets ({type(first).__name__}; each line lists what differs from {first_name!r}):"]
    for name, cfg in presets.items():
        diff = [f"{flag(f.name)} {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(first, f.name)]
        lines.append(f"  {name:<10} {', '.join(diff) or '(the defaults)'}")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the presets' lines as written and appends each option's default to its help."""


def build_parser(presets: dict, prog: str, description: str, preset: str) -> ArgumentParser:
    """--preset/--out/--overwrite, then every field of the preset's dataclass with its type, this
    preset's value, its range and its meaning."""
    cfg = presets[preset]
    parser = ArgumentParser(prog=prog, allow_abbrev=False, epilog=describe_presets(presets),
                            usage="%(prog)s [--preset P] [--out DIR] [--overwrite] [--FIELD VALUE ...]",
                            formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=32),
                            description=textwrap.fill(f"{description} Defaults below are those of --preset {preset}."))
    # argparse takes "-3" and "-0.5" for values, but "-1e-3" and "-inf" for unknown options, so that
    # `--lr -1e-3` would fail with "expected one argument": every number is a value here.
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-(inf|infinity|nan)$", re.I)
    parser.add_argument("--preset", default=preset, choices=list(presets), metavar="P",
                        help=f"the dataclass of defaults the options below override: {', '.join(presets)}")
    parser.add_argument("--out", default=default_out(prog, preset), metavar="DIR",
                        help="output folder, created if missing: summary.json (and any figure the script draws)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the finished run in --out (else a folder holding a summary.json is refused)")
    group = parser.add_argument_group(f"{type(cfg).__name__} (the values of --preset {preset})")
    hints, meanings, valid = typing.get_type_hints(type(cfg)), field_meanings(type(cfg)), ranges(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        text = meanings.get(f.name, "") + (f"; {valid[f.name]}" if f.name in valid else "")
        # Unset options stay absent (SUPPRESS), so only what the user typed overrides the preset; the
        # default is written by hand, a string quoted so that "" shows. argparse %-formats help: %%.
        group.add_argument(flag(f.name), dest=f"field.{f.name}", default=argparse.SUPPRESS,
                           metavar=type_name(hints[f.name]),
                           help=f"{text} (default: {value!r})".replace("%", "%%"))
    return parser


def parse_config(argv, presets: dict, prog: str, description: str):
    """`[--preset P] [--out DIR] [--overwrite] [--key value ...]` -> (the preset's dataclass with the
    overrides applied and checked, the output folder checked to be free)."""
    first = ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    first.add_argument("--preset", default=next(iter(presets)), help="the preset, read first: the other options take its values")
    preset = first.parse_known_args(argv)[0].preset
    if preset not in presets:
        first.error(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    parser = build_parser(presets, prog, description.strip().splitlines()[0], preset)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        if unknown[0].startswith("-"):
            valid = sorted(a.option_strings[-1] for a in parser._actions if a.option_strings)
            parser.error(f"unknown option {unknown[0].split('=')[0]}; valid options are {', '.join(valid)}")
        parser.error(f"expected --option value, got {unknown[0]!r}")
    given = {k.removeprefix("field."): v for k, v in vars(ns).items() if k.startswith("field.")}
    try:
        cfg = apply_overrides(presets[preset], given, where=prog)
        check_config(cfg)
    except (UserTypeError, ValueError) as e:  # a value of the wrong type, out of range, not a choice
        parser.error(str(e).removeprefix(f"{prog}: "))
    out = Path(ns.out)
    check_out(out, ns.overwrite)
    return cfg, out

"""The options of a training command line, made from its recipe's config dataclasses.

Every field of the three configs of a `Recipe` (the model's or the method's, the loop's
`TrainConfig`, the data's) becomes a `--field-name` option parsed to the field's declared type;
`--help` shows each one's type, the chosen preset's value and, as its meaning, the comment on
its line of the dataclass (`field_meanings`). training/cli.py's `parse` reads them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Callable

from architectures.utils.command_line import ArgumentParser
from architectures.utils.config import parse_value
from training.recipes import Recipe


def field_meanings(cls: type) -> dict[str, str]:
    """The comment on each field's line of a config dataclass (inherited fields too): its --help text."""
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source to read (a frozen application): names and types only
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments:
                meanings[node.target.id] = comments[node.end_lineno]
    return meanings


def type_name(tp) -> str:
    """`int`, `float`, `int|None`, `dict|None`: a field's annotation as --help shows it."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(typing.get_origin(tp) or tp, "__name__", str(tp))


def _converter(name: str, tp) -> Callable[[str], Any]:
    """argparse `type=`: the text parsed to the field's declared type, or a one-line refusal."""
    def convert(text: str):
        try:
            return parse_value(name, text, tp, name)
        except TypeError:
            raise argparse.ArgumentTypeError(f"expects {type_name(tp).replace('|', ' or ')}, got {text!r}") from None
    return convert


def _refuse_vocab_size(text: str):
    raise argparse.ArgumentTypeError("the model's vocab_size comes from the tokenizer; set --bpe-vocab-size instead")


def build_parser(prog: str, about: str, recipes: dict[str, Recipe], preset: str, out: str,
                 out_note: str = "") -> ArgumentParser:
    """The full parser for one preset: --preset/--out/--resume, then every field of its model config,
    TrainConfig and DataConfig, grouped, each with its type, this preset's value and its meaning.
    `about` is the command's one-line description, `out` the default --out (`out_note`: when not)."""
    recipe = recipes[preset]
    parser = ArgumentParser(prog=prog, allow_abbrev=False, usage="%(prog)s [--preset P] [--out DIR] [--resume] [--FIELD VALUE ...]",
                            formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=40),
                            description=f"{about}. Presets: {', '.join(recipes)}; the defaults below are those of "
                                        f"--preset {preset}.")
    parser.add_argument("--preset", default=preset, choices=sorted(recipes),
                        help=f"the recipe: {type(recipe.model).__name__}, TrainConfig and {type(recipe.data).__name__} "
                             f"settings, one of {', '.join(recipes)}")
    # No default in the result (SUPPRESS): a run must know whether --out was given (see cli.run).
    parser.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                        help=f"output directory: checkpoint, metrics.jsonl, loss.png, summary.json (default: {out}"
                             + (f"; {out_note}" if out_note else "") + ")")
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint in --out exactly (same settings, corpus and tokenizer)")
    taken = {"preset", "out", "resume"}
    # A method's recipe may put its own options in the first group (SFTConfig) and its data in the third.
    for part, title in (("model", f"{getattr(recipe.model, 'GROUP', 'model')} ({type(recipe.model).__name__})"),
                        ("train", "training loop (TrainConfig)"), ("data", f"data ({type(recipe.data).__name__})")):
        cfg = getattr(recipe, part)
        group = parser.add_argument_group(title)
        hints, meanings = typing.get_type_hints(type(cfg)), field_meanings(type(cfg))
        for f in dataclasses.fields(cfg):
            if f.name in taken:
                continue  # the first config that has a field owns its option
            taken.add(f.name)
            flag, tp, value = "--" + f.name.replace("_", "-"), hints[f.name], getattr(cfg, f.name)
            if part == "model" and f.name == "vocab_size":
                group.add_argument(flag, type=_refuse_vocab_size, default=argparse.SUPPRESS, metavar="-",
                                   help="set from the tokenizer: choose it with --bpe-vocab-size")
                continue
            # The default is written into the help by hand: unset options must stay absent from the
            # result (SUPPRESS), so that only what the user typed overrides the preset. A string is
            # shown quoted, so that "\n" is visible; argparse %-formats help, hence the %%.
            shown = repr(value) if isinstance(value, str) else value
            text = f"{meanings.get(f.name, '')} (default: {shown})".replace("%", "%%")
            kwargs = dict(nargs="?", const=True) if isinstance(value, bool) else {}  # a bare --compile is true
            group.add_argument(flag, dest=f"{part}.{f.name}", type=_converter(f.name, tp), default=argparse.SUPPRESS,
                               metavar=type_name(tp), help=text, **kwargs)
    return parser

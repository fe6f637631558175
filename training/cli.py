"""The command line every architecture's train.py shares, in steps a method's train.py reuses.

    python -m architectures.<name>.train --preset P [--max-steps N] [--out DIR] [--device D] [--resume]
                                         [--any-config-field VALUE ...]

A preset is a `Recipe`: the model config, the loop's `TrainConfig` and a `DataConfig`.
Every other `--key value` overrides the one field of that name in one of the three
dataclasses, parsed to its declared type, so a typo or a wrong type is a clear error.
`--help` lists them all, grouped, with the chosen preset's values and, as each one's meaning,
the comment on its line of the dataclass.

The run is one function per step; `run` composes them, and a method's train.py calls the
ones it needs:
  parse         the command line -> `Args`; checks what can be checked at once (the device, the
                loop's config, the checkpoint on --resume) before anything slow starts
  load_data     corpus -> tokenizer (trained once, cached; or one given, a teacher's) -> tokenized
                splits (cached), with the corpus's and the tokenizer's sha256, which a resumed run must match
  build_model   the model config with the tokenizer's vocabulary -> the model
  train         the shared loop (training/trainer.py) -> a checkpoint in DIR
  final_report  validation over the whole split, summary.json, the printed line, a sample
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import textwrap
import time
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from architectures import registry
from architectures.utils.files import atomic_write_json
from architectures.utils.config import parse_value
from architectures.utils.command_line import ArgumentParser
from training import checkpointing
from training.data import Corpus, TokenData, get_corpus, prepare_data, split_text, token_cache_folder
from architectures.utils.device import device_label, resolve_device
from training.lm import evaluate_split
from training.tokenizer import KINDS, MIN_BPE_VOCAB, Tokenizer, fingerprint, get_tokenizer, tokenizer_cache_path
from training.recipes import DataConfig, Recipe, pretraining_recipes
from training.train_config import TrainConfig, validate
from training.trainer import TrainResult, train


@dataclass
class Args:
    family: str  # the architecture family, as the registry names it
    preset: str  # the recipe's name
    recipe: Recipe  # the preset with the command line's overrides applied
    out: Path  # the output directory
    resume: bool  # continue the checkpoint in `out`
    saved_record: dict | None  # on --resume: the configs and data fingerprints the checkpoint was made with


def is_main_process() -> bool:
    """Under torchrun only rank 0 talks to the terminal and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str) -> None:
    if is_main_process():
        print(line, flush=True)


# ---------------------------------------------------------------------------- parse


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


def build_parser(prog: str, family: str, recipes: dict[str, Recipe], preset: str) -> ArgumentParser:
    """The full parser for one preset: --preset/--out/--resume, then every field of its model config,
    TrainConfig and DataConfig, grouped, each with its type, this preset's value and its meaning."""
    recipe = recipes[preset]
    parser = ArgumentParser(prog=prog, allow_abbrev=False, usage="%(prog)s [--preset P] [--out DIR] [--resume] [--FIELD VALUE ...]",
                            formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=40),
                            description=f"Train {family} with the zoo's shared loop, data and tokenizer. "
                                        f"Defaults below are those of --preset {preset}.")
    parser.add_argument("--preset", default=preset, choices=sorted(recipes),
                        help="the recipe: model, training-loop and data settings")
    parser.add_argument("--out", default=f"runs/{family}-{preset}", metavar="DIR",
                        help="output directory: checkpoint, metrics.jsonl, loss.png, summary.json")
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


def rederive(cfg, changes: dict) -> dict:
    """Fields a config derives when left None (`DERIVED`, e.g. LlamaConfig's head_dim = hidden_size //
    heads) are derived again from the overridden sizes, unless the preset set them by hand or the
    command line sets them: `--hidden-size 64` on a preset of 128 / 4 heads gives head_dim 16, not 32."""
    out = dict(changes)
    for name in getattr(type(cfg), "DERIVED", ()):
        if name not in changes and changes and getattr(dataclasses.replace(cfg, **{name: None}), name) == getattr(cfg, name):
            out[name] = None
    return out


def parse(argv: list[str] | None, recipes: dict[str, Recipe], family: str, prog: str | None = None) -> Args:
    """The command line -> `Args`, with every check that needs no data done now (a bad device, a
    bad loop config, --resume without a checkpoint) rather than after the corpus is tokenized."""
    prog = prog or f"python -m architectures.{family}.train"
    default = "tiny" if "tiny" in recipes else next(iter(recipes))
    # --preset first: the options of the full parser, and their defaults, are the preset's.
    first = ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    first.add_argument("--preset", default=default)
    preset = first.parse_known_args(argv)[0].preset
    if preset not in recipes:
        first.error(f"unknown preset {preset!r} for {family}; choose one of {sorted(recipes)}")
    parser = build_parser(prog, family, recipes, preset)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = sorted(a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help")
        flag = unknown[0].split("=", 1)[0]
        raise ValueError(f"unknown option {flag}; valid options are {', '.join(valid)}" if flag.startswith("--")
                         else f"expected --option, got {flag!r}")
    ns = vars(ns)
    recipe = recipes[preset]
    given = {part: {k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(part + ".")}
             for part in ("model", "train", "data")}
    given["model"] = rederive(recipe.model, given["model"])
    recipe = Recipe(**{part: dataclasses.replace(getattr(recipe, part), **given[part]) for part in given})
    train_cfg, model_cfg, data_cfg = recipe.train, recipe.model, recipe.data
    validate(train_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    resolve_device(train_cfg.device)
    if train_cfg.block_size > getattr(model_cfg, "max_position_embeddings", train_cfg.block_size):
        raise ValueError(f"--block-size {train_cfg.block_size} exceeds the model's max_position_embeddings="
                         f"{model_cfg.max_position_embeddings}; lower --block-size or raise --max-position-embeddings")
    if isinstance(data_cfg, DataConfig) and data_cfg.tokenizer not in KINDS:
        raise ValueError(f"--tokenizer {data_cfg.tokenizer!r} is not one of {KINDS}")
    if isinstance(data_cfg, DataConfig) and data_cfg.tokenizer == "bpe" and data_cfg.bpe_vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"--bpe-vocab-size {data_cfg.bpe_vocab_size} is too small: byte-level BPE needs the 256 bytes "
                         f"and 5 special tokens, at least {MIN_BPE_VOCAB}")
    out = Path(ns["out"])
    saved = checkpointing.read_record(out) if ns["resume"] else None
    if not ns["resume"]:
        checkpointing.check_fresh(out)
    return Args(family, preset, recipe, out, ns["resume"], saved)


# ---------------------------------------------------------------------------- data


@dataclass
class RunData:
    corpus: Corpus  # the text, what it is, where it came from, its sha256
    tokenizer: Tokenizer
    tokens: TokenData  # both splits as token ids

    def record(self) -> dict:
        """The data fingerprints a checkpoint records and a resumed run must match."""
        return data_record(self.corpus, self.tokenizer)

    def check_fits(self, block_size: int) -> None:
        """Both splits must hold a window of block_size + 1 tokens; checked now, not at the loop's
        first evaluation, which may come hundreds of steps in."""
        for split, tokens in (("train", self.tokens.train), ("validation", self.tokens.val)):
            if len(tokens) < block_size + 1:
                raise ValueError(f"the {split} split of {self.corpus.name} has {len(tokens):,} tokens, but "
                                 f"block_size={block_size} needs at least {block_size + 1} (inputs plus the shifted "
                                 f"targets); pass a smaller --block-size or use a longer corpus")

    def batches(self, block_size: int) -> Callable[[str, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
        """The loop's `sample_batch`: (x, y) windows of block_size tokens."""
        return lambda split, n, generator: self.tokens.get_batch(split, n, block_size, generator)


def data_record(corpus: Corpus, tokenizer: Tokenizer) -> dict:
    return {"corpus": {"name": corpus.name, "sha256": corpus.sha256},
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "sha256": fingerprint(tokenizer)}}


def check_same_data(saved: dict | None, now: dict, out: Path, origin: str = "") -> None:
    """On --resume: the corpus and the tokenizer must be the ones the checkpoint was trained with
    (`origin`: where this run's corpus was read from, for the message)."""
    if saved is None or "corpus" not in saved:
        return  # a new run; a checkpoint without fingerprints is refused by the record comparison
    differ = []
    if saved["corpus"] != now["corpus"]:
        differ.append(f"corpus {saved['corpus']['name']!r} (sha256 {saved['corpus']['sha256'][:16]}) then, "
                      f"{now['corpus']['name']!r} (sha256 {now['corpus']['sha256'][:16]}"
                      + (f", from {origin}" if origin else "") + ") now")
    if saved.get("tokenizer") != now["tokenizer"]:
        then, new = saved.get("tokenizer") or {}, now["tokenizer"]
        differ.append(f"tokenizer {then.get('kind')} {then.get('vocab_size')} (sha256 {str(then.get('sha256'))[:16]}) "
                      f"then, {new['kind']} {new['vocab_size']} (sha256 {new['sha256'][:16]}) now")
    if differ:
        raise ValueError(f"--resume: the checkpoint in {out} was trained on other data: " + "; ".join(differ)
                         + ". Resume where the same corpus is found (the same --dataset; for tinyshakespeare the "
                           "same ZOO_DATA_DIR, cache or network), or start a new run in another --out")


def load_data(data_cfg, saved_record: dict | None = None, out: Path | None = None,
              tokenizer: Tokenizer | None = None, whose: str = "the given one") -> RunData:
    """Corpus -> tokenizer -> token ids of both splits, saying what it does. On a resume
    (`saved_record` given) the corpus and tokenizer must match the checkpoint's before any
    token is cached or any file in `out` is touched. A `tokenizer` given (`whose`: "the teacher's")
    is used as it is, and only `data_cfg.dataset` is read; otherwise one is trained on the corpus
    as `data_cfg` (a `DataConfig`) says, once, and cached."""
    t0 = time.perf_counter()
    corpus = get_corpus(data_cfg.dataset)
    say(f"corpus: {corpus.name}, {len(corpus.text):,} characters, from {corpus.origin}")
    if tokenizer is not None:
        say(f"tokenizer: {whose}, {tokenizer.kind} {tokenizer.vocab_size}")
    else:
        tokenizer = train_tokenizer(corpus, data_cfg)
    check_same_data(saved_record, data_record(corpus, tokenizer), out, corpus.origin)
    if not (token_cache_folder(corpus.text, tokenizer) / "meta.json").is_file():
        say("tokens: encoding the train and validation splits (once: they are cached)")
    tokens = prepare_data(data_cfg.dataset, tokenizer, text=corpus.text)
    say(f"tokens: {len(tokens.train):,} train, {len(tokens.val):,} validation "
        f"({tokens.val_chars_per_token:.2f} characters per token); data ready in {time.perf_counter() - t0:.1f} s")
    return RunData(corpus, tokenizer, tokens)


def train_tokenizer(corpus: Corpus, data_cfg: DataConfig) -> Tokenizer:
    """The tokenizer `data_cfg` asks for, fitted to the corpus (from the cache after the first time)."""
    train_text, _ = split_text(corpus.text)
    # BPE merges are learned from the training split only; a char vocabulary needs every character.
    fit_text = corpus.text if data_cfg.tokenizer == "char" else train_text
    cached = tokenizer_cache_path(fit_text, data_cfg.tokenizer, data_cfg.bpe_vocab_size)
    size = f" with {data_cfg.bpe_vocab_size} tokens" if data_cfg.tokenizer == "bpe" else ""
    if cached.is_file():
        say(f"tokenizer: {data_cfg.tokenizer}{size}, from the cache {cached}")
    else:
        say(f"tokenizer: training {data_cfg.tokenizer}{size} on {len(fit_text):,} characters "
            f"(once: it is cached in {cached.parent})")
    return get_tokenizer(fit_text, data_cfg.tokenizer, data_cfg.bpe_vocab_size)


# ---------------------------------------------------------------------------- model, checkpoint, report

def build_model(model_cls: type, model_cfg, train_cfg: TrainConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    """The model of `model_cfg` with the tokenizer's vocabulary, initialised from the run's seed."""
    cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(train_cfg.seed)
    return model_cls(cfg)


def checkpoint_saver(save_pretrained: Callable, tokenizer: Tokenizer) -> Callable:
    """The loop's `save_model`: the architecture's files plus the tokenizer, so the folder generates alone."""
    def save_model(model, directory: Path, state_dict=None) -> None:
        save_pretrained(model, directory, state_dict)
        tokenizer.save(directory / "tokenizer.json")
    return save_model


def final_report(model: torch.nn.Module, data: RunData, args: Args, result: TrainResult, from_pretrained: Callable,
                 t_start: float, t_prep: float, sample: bool = True) -> dict:
    """Validation over the whole split, summary.json, the printed line and a sample (main process only)."""
    if not is_main_process():
        return {}  # under torchrun the main process evaluates and samples
    train_cfg = args.recipe.train
    device = resolve_device(train_cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The trained model may be sharded (FSDP2) across processes that have now exited:
        # evaluate the gathered copy the checkpoint holds.
        model = from_pretrained(args.out, device=device)
    val_loss = evaluate_split(model, data.tokens.val, train_cfg.block_size, device=device)
    summary = {
        "family": args.family, "preset": args.preset, "steps": result.step,
        "corpus": data.corpus.name, "corpus_sha256": data.corpus.sha256,
        "tokenizer": f"{data.tokenizer.kind} {data.tokenizer.vocab_size}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss_per_token": val_loss, "val_nats_per_char": val_loss / data.tokens.val_chars_per_token,
        "prep_s": t_prep, "train_s": result.elapsed_s, "total_s": time.perf_counter() - t_start,
        "device": device_label(device),
    }
    atomic_write_json(args.out / "summary.json", summary)
    print(f"validation (whole split of {summary['corpus']}): {val_loss:.4f} nats/token = "
          f"{summary['val_nats_per_char']:.4f} nats/char; {summary['parameters']:,} parameters; "
          f"{summary['total_s']:.0f} s in all ({summary['device']})", flush=True)
    if sample:
        from inference.sampling import generate
        from inference.sampling import SamplingParams

        prompt = data.tokenizer.encode(args.recipe.data.sample_prompt)
        n_new = min(200, model.config.max_position_embeddings - len(prompt))
        tokens = generate(model, prompt, SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n_new, seed=0))
        print("---- sample ----")
        print(data.tokenizer.decode(prompt + tokens))
    print(f"---- checkpoint, metrics.jsonl and loss.png in {args.out} ----", flush=True)
    return summary


def run(family: str, argv=None, recipes: dict[str, Recipe] | None = None) -> dict:
    """Train a registered family on one of its recipes (by default its pretraining recipes) with the
    family's whole contract from the registry: model class, loss, per-step hook, save/load, FLOPs.
    Returns (and writes to DIR/summary.json) the final figures."""
    contract = registry.family(family)
    args = parse(argv, recipes or pretraining_recipes(family), family)
    t_start = time.perf_counter()
    train_cfg = args.recipe.train
    data = load_data(args.recipe.data, args.saved_record, args.out)
    data.check_fits(train_cfg.block_size)
    model = build_model(contract.model_class, args.recipe.model, train_cfg, data.tokenizer)
    say(f"model: {family} {args.preset}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"training {train_cfg.max_steps} steps into {args.out}" + (" (resumed)" if args.resume else ""))
    t_prep = time.perf_counter() - t_start
    result = train(
        model, contract.loss, data.batches(train_cfg.block_size), train_cfg, args.out,
        save_model=checkpoint_saver(contract.save_pretrained, data.tokenizer), resume=args.resume,
        val_units_per_token=1.0 / data.tokens.val_chars_per_token,
        config_record={"model": dataclasses.asdict(model.config), "data": dataclasses.asdict(args.recipe.data),
                       **data.record()},
        flops_per_token=contract.flops_per_token(model.config, train_cfg.block_size), loss_label=contract.loss_label,
        on_step=contract.on_step,
    )
    return final_report(model, data, args, result, contract.from_pretrained, t_start, t_prep)

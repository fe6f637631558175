"""The command line every architecture's train.py shares, in steps a method's train.py reuses.

    python -m architectures.<name>.train --preset P [--max-steps N] [--out DIR] [--device D] [--resume]
                                         [--any-config-field VALUE ...]

A preset is a `Recipe`: the model config, the loop's `TrainConfig` and a `DataConfig`.
Every other `--key value` overrides the one field of that name in one of the three
dataclasses, parsed to its declared type, so a typo or a wrong type is a clear error.
`--help` lists them all, grouped, with the chosen preset's values and, as each one's meaning,
the comment on its line of the dataclass (training/options.py builds the parser).

The run is one function per step; `run` composes them, and a method's train.py calls the
ones it needs:
  parse         the command line -> `Args`; checks what can be checked at once (the device, the
                loop's config, the checkpoint on --resume, that --out can be written) before
                anything slow starts
  load_data     corpus -> tokenizer (trained once, cached; or one given, a teacher's) -> tokenized
                splits (cached), with the corpus's and the tokenizer's sha256, which a resumed run must match
  build_model   the model config with the tokenizer's vocabulary -> the model
  train         the shared loop (training/trainer.py) -> a checkpoint in DIR
  final_report  validation over the whole split, summary.json, the printed line, a sample
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from architectures import registry
from architectures.utils.files import atomic_write_json
from architectures.utils.command_line import ArgumentParser
from training import checkpointing
from training.checks import check_writable
from training.data import Corpus, TokenData, get_corpus, prepare_data, split_text, token_cache_folder
from architectures.utils.device import device_label, resolve_device
from training.lm import evaluate_split
from training.tokenizer import KINDS, MIN_BPE_VOCAB, Tokenizer, fingerprint, get_tokenizer, tokenizer_cache_path
from training.options import build_parser
from training.recipes import DataConfig, Recipe, pretraining_recipes
from training.train_config import RESUMABLE_CHANGES, TrainConfig, config_notes, validate
from training.trainer import TrainResult, train


@dataclass
class Args:
    family: str  # the architecture family, as the registry names it
    preset: str  # the recipe's name
    recipe: Recipe  # the preset with the command line's overrides applied
    out: Path  # the output directory
    resume: bool  # continue the checkpoint in `out`
    saved_record: dict | None  # on --resume: the configs and data fingerprints the checkpoint was made with
    out_given: bool = False  # whether --out was on the command line (else `out` is the preset's default)


def is_main_process() -> bool:
    """Under torchrun only rank 0 talks to the terminal and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str, err: bool = False) -> None:
    """A line for the person at the terminal, from the main process only (stderr for a `note:`)."""
    if is_main_process():
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


# ---------------------------------------------------------------------------- parse


def rederive(cfg, changes: dict) -> dict:
    """Fields a config derives when left None (`DERIVED`, e.g. LlamaConfig's head_dim = hidden_size //
    heads) are derived again from the overridden sizes, unless the preset set them by hand or the
    command line sets them: `--hidden-size 64` on a preset of 128 / 4 heads gives head_dim 16, not 32."""
    out = dict(changes)
    for name in getattr(type(cfg), "DERIVED", ()):
        if name not in changes and changes and getattr(dataclasses.replace(cfg, **{name: None}), name) == getattr(cfg, name):
            out[name] = None
    return out


def parse(argv: list[str] | None, recipes: dict[str, Recipe], family: str, prog: str | None = None,
          about: str | None = None) -> Args:
    """The command line -> `Args`, with every check that needs no data done now (a bad device, a
    bad loop config, --resume without a checkpoint or with other settings, an --out that cannot be
    written) rather than after the corpus is tokenized. `about`: the command's one-line description."""
    prog = prog or f"python -m architectures.{family}.train"
    default = "tiny" if "tiny" in recipes else next(iter(recipes))
    # --preset first: the options of the full parser, and their defaults, are the preset's.
    first = ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    first.add_argument("--preset", default=default, help="the recipe, read first: the other options take its values")
    preset = first.parse_known_args(argv)[0].preset
    if preset not in recipes:
        first.error(f"unknown preset {preset!r} for {family}; choose one of {sorted(recipes)}")
    default_out = f"runs/{family}-{preset}"
    pretraining = isinstance(recipes[preset].data, DataConfig)
    parser = build_parser(prog, about or f"Train {family} with the zoo's shared loop, data and tokenizer", recipes,
                          preset, default_out, f"{fallback_out(Path(default_out))} when the corpus is the offline "
                                               f"stand-in for Tiny Shakespeare" if pretraining else "")
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
    check_recipe(recipe)
    for note in config_notes(recipe.train, int(os.environ.get("WORLD_SIZE", "1")), set(given["train"])):
        say(f"note: {note}", err=True)
    out, resume = Path(ns.get("out", default_out)), ns["resume"]
    return Args(family, preset, recipe, out, resume, check_out(out, resume, recipe), out_given="out" in ns)


def check_recipe(recipe: Recipe) -> None:
    """What can be refused in the settings alone: the loop's config, the device, the block size, the
    tokenizer, the sample's prompt."""
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
    if getattr(data_cfg, "sample_prompt", None) == "":
        raise ValueError("--sample-prompt is empty: the sample at the end of the run continues it, so it must encode "
                         "to at least one token; pass some text (the default is a newline, '\\n')")


def check_out(out: Path, resume: bool, recipe: Recipe) -> dict | None:
    """--out before anything starts: on --resume it must hold a whole checkpoint made with these
    settings (the loop's, the data's and a method's options: a model or a base is not built yet to
    compare); otherwise no checkpoint. Either way it must be writable. Returns the checkpoint's record."""
    saved = None
    if resume:
        saved = checkpointing.read_record(out)
        now = {"train": vars(recipe.train).copy(), "data": dataclasses.asdict(recipe.data)}
        if getattr(recipe.model, "GROUP", None) == "method":
            now["method"] = dataclasses.asdict(recipe.model)
        checkpointing.check_record(out, saved, now, RESUMABLE_CHANGES, common_only=True)
    else:
        checkpointing.check_fresh(out)
    check_writable(out)
    return saved


def fallback_out(out: Path) -> Path:
    """Where a run writes that fell back to the embedded corpus and was given no --out."""
    return out.with_name(out.name + "-offline-fallback")


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
              tokenizer: Tokenizer | None = None, whose: str = "the given one", corpus: Corpus | None = None) -> RunData:
    """Corpus -> tokenizer -> token ids of both splits, saying what it does. On a resume
    (`saved_record` given) the corpus and tokenizer must match the checkpoint's before any
    token is cached or any file in `out` is touched. A `tokenizer` given (`whose`: "the teacher's")
    is used as it is, and only `data_cfg.dataset` is read; otherwise one is trained on the corpus
    as `data_cfg` (a `DataConfig`) says, once, and cached. A `corpus` already found is not read again."""
    t0 = time.perf_counter()
    corpus = corpus or get_corpus(data_cfg.dataset)
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


def away_from_default_out(args: Args, corpus: Corpus) -> Args:
    """A run on the offline stand-in for Tiny Shakespeare that was given no --out writes beside the
    preset's folder, never in it: runs/llama3-tiny is the base every method takes by default, and
    a real run there would find it taken."""
    if not corpus.is_fallback or args.out_given:
        return args
    out = fallback_out(args.out)
    say(f"out: the corpus is the offline stand-in, not Tiny Shakespeare, so this run writes to {out}, not {args.out} "
        f"(which the post-training methods take as their base); continue it with --resume --out {out}")
    return dataclasses.replace(args, out=out, saved_record=check_out(out, args.resume, args.recipe))


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
    contract = registry.require_lm(family, "the language-model training command line (training/cli.py)")
    args = parse(argv, recipes or pretraining_recipes(family), family)
    t_start = time.perf_counter()
    train_cfg = args.recipe.train
    corpus = get_corpus(args.recipe.data.dataset)
    args = away_from_default_out(args, corpus)
    data = load_data(args.recipe.data, args.saved_record, args.out, corpus=corpus)
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

"""Fine-tuning on conversations, step by step: what SFT's and LoRA's train scripts run.

  prepare   load the base and its tokenizer, render the conversations in the base's chat format,
            pack them into rows, pick the held-out questions
  score     the held-out questions of each built-in task answered greedily, by exact match
  fit       the shared loop on the packed rows, with the base family's auxiliary terms and hook
  report    exact match before and after, a few replies, summary.json
  run       the four for SFT itself (`python -m training.sft.train`); training/lora/train.py wraps
            the model in adapters between `prepare` and `fit`

`sft_checkpoint` is the SFT model a preference or RL method starts from, made by `run` when missing.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from architectures import registry
from architectures.utils.device import resolve_device
from training import tasks
from training.chat import FORMATS, ChatFormat, chat_format, load_conversations
from training.checks import check_in
from training.cli import Args, parse, say
from training.data import get_corpus
from training.posttrain import family_on_step, method_saver, pretrained_dir, with_aux_loss, write_summary
from training.sft.batch import SFTBatches, encode_all
from training.sft.loss import sft_loss
from training.sft.recipes import RECIPES
from training.tokenizer import Tokenizer
from training.trainer import train


@dataclass
class Prepared:
    model: torch.nn.Module
    base: Path
    tokenizer: Tokenizer
    fmt: ChatFormat
    batches: SFTBatches
    eval_sets: dict  # task name -> held-out Examples
    record: dict  # what a resumed run must agree with


def base_dir(args: Args) -> Path:
    """The checkpoint to start from; for a preset's default, the quick start's, trained now if missing."""
    return pretrained_dir(args.recipe.model.base, "--base", args.preset, "fine-tuning needs the base's own tokenizer")


def sft_checkpoint(preset: str, base: str = "") -> Path:
    """The SFT model a preference or RL method starts from: `base` if given, else this preset's SFT
    run, runs/sft-PRESET, made now (with the quick start's base) if it is missing."""
    if base:
        return Path(base)
    path = Path(f"runs/sft-{preset}")
    if not (path / "config.json").is_file():
        say(f"base: {path} does not exist yet, so SFT makes it first "
            f"(python -m training.sft.train --preset {preset} --out {path})")
        run(["--preset", preset, "--out", str(path)])
    return path


def check_method(args: Args) -> None:
    """SFT's options that can be refused before a base is made or loaded (LoRA's run checks them too)."""
    method, data_cfg = args.recipe.model, args.recipe.data
    if method.chat_format != "auto" and method.chat_format not in FORMATS:
        raise ValueError(f"--chat-format {method.chat_format!r} is not one of 'auto', "
                         + ", ".join(repr(name) for name in FORMATS))
    for flag, value, low in (("--arithmetic-examples", data_cfg.arithmetic_examples, 0),
                             ("--arithmetic-digits", data_cfg.arithmetic_digits, 1),
                             ("--speaker-examples", data_cfg.speaker_examples, 0),
                             ("--eval-examples", data_cfg.eval_examples, 1),
                             ("--val-conversations", data_cfg.val_conversations, 1),
                             ("--max-new-tokens", data_cfg.max_new_tokens, 1)):
        check_in(flag, value, f"[{low}, inf)")


def given_conversations(dataset: str) -> list:
    """The conversations of --dataset (a file or a hub name), read and checked before any base is made."""
    convs = load_conversations(dataset)
    if len(convs) < 2:
        raise ValueError(f"--dataset {dataset} holds {len(convs)} conversation{'s' * (len(convs) != 1)}; SFT needs at least 2 (a tenth of "
                         f"them, at least one, is held out for the validation loss)")
    return convs


def prepare(args: Args) -> Prepared:
    """Load the base model and its tokenizer, render the conversations, pick the held-out sets."""
    cfg, data_cfg = args.recipe.train, args.recipe.data
    convs = given_conversations(data_cfg.dataset) if data_cfg.dataset != "builtin" else None
    base = base_dir(args)
    device = resolve_device(cfg.device)
    model = registry.from_pretrained(base, device=device)
    model.train()
    tokenizer = Tokenizer.from_file(base)
    fmt = chat_format(tokenizer, None if args.recipe.model.chat_format == "auto" else args.recipe.model.chat_format)
    block = cfg.block_size
    if block > model.config.max_position_embeddings:
        raise ValueError(f"--block-size {block} exceeds the base's max_position_embeddings="
                         f"{model.config.max_position_embeddings}; lower --block-size")
    eval_sets = {}
    if data_cfg.dataset == "builtin":
        sizes = {"arithmetic": data_cfg.arithmetic_examples, "speaker": data_cfg.speaker_examples}
        corpus = get_corpus("tinyshakespeare") if sizes["speaker"] else None  # the play the speaker task asks about
        if corpus is not None and corpus.is_fallback:  # no play to ask about: the arithmetic task alone
            say("data: Tiny Shakespeare is not available, so the built-in set is the arithmetic task alone")
            sizes["speaker"] = 0
        text = corpus.text if corpus is not None else ""
        train_set = [e for name, n in sizes.items() if n
                     for e in task_examples(name, "train", n, text, data_cfg.arithmetic_digits)]
        held = {name: task_examples(name, "test", data_cfg.eval_examples + data_cfg.val_conversations // 2, text,
                                    data_cfg.arithmetic_digits)
                for name, n in sizes.items() if n}
        # The held-out questions are split in two: the first ones are scored, the rest give the loop's validation loss.
        eval_sets = {name: ex[:data_cfg.eval_examples] for name, ex in held.items()}
        val_convs = [e.conversation() for ex in held.values() for e in ex[data_cfg.eval_examples:]]
        train_convs = [e.conversation() for e in train_set]
    else:
        cut = max(1, min(data_cfg.val_conversations, len(convs) // 10))
        train_convs, val_convs = convs[:-cut], convs[-cut:]
    say(f"data: {len(train_convs):,} training conversations, {len(val_convs):,} validation; chat format {fmt.name}")
    batches = SFTBatches(encode_all(train_convs, fmt, block), encode_all(val_convs, fmt, block, "validation conversation"),
                         block, tokenizer.pad_id if tokenizer.pad_id is not None else 0, args.recipe.model.pack)
    # "chat_format": what `python -m inference.generate` reads to ask the model in the format it learned.
    record = {"method": dataclasses.asdict(args.recipe.model), "data": dataclasses.asdict(data_cfg),
              "base": str(base), "model": dataclasses.asdict(model.config), "chat_format": fmt.name}
    return Prepared(model, base, tokenizer, fmt, batches, eval_sets, record)


def task_examples(name: str, split: str, n: int, text: str, digits: int) -> list:
    return tasks.arithmetic(split, n, max_digits=digits) if name == "arithmetic" else tasks.speaker(text, split, n)


def score(p: Prepared, max_new_tokens: int) -> dict[str, float]:
    return {name: tasks.exact_match(p.model, p.fmt, ex, max_new_tokens) for name, ex in p.eval_sets.items()}


def fit(p: Prepared, args: Args, save_model, loss_fn=sft_loss):
    """The shared loop on the packed conversations; a mixture-of-experts base keeps its family's
    auxiliary terms in the loss and its per-step hook."""
    cfg = args.recipe.train
    return train(p.model, with_aux_loss(loss_fn, p.model), p.batches, cfg, args.out, save_model=save_model,
                 config_record=p.record, resume=args.resume, on_step=family_on_step(p.model),
                 loss_label="train loss (assistant tokens)")


def report(p: Prepared, args: Args, before: dict, result, t_start: float, extra: dict | None = None) -> dict:
    after = score(p, args.recipe.data.max_new_tokens)
    device = resolve_device(args.recipe.train.device)
    for name in after:
        say(f"held-out exact match, {name}: {before[name]:.1%} before -> {after[name]:.1%} after "
            f"({len(p.eval_sets[name])} questions)")
    for e in [ex[0] for ex in p.eval_sets.values()]:
        reply = tasks.replies(p.model, p.fmt, [e.prompt], args.recipe.data.max_new_tokens)[0]
        say(f"  {e.prompt[-1]['content']!r} -> {reply!r} (expected {e.answer!r})")
    summary = {"base": str(p.base), "preset": args.preset, "steps": result.step, "val_loss": result.val_loss,
               "exact_match_before": before, "exact_match_after": after, "train_s": result.elapsed_s, **(extra or {})}
    return write_summary(args.out, summary, t_start, device, "checkpoint, metrics.jsonl and loss.png")


def run(argv=None) -> dict:
    """SFT from the command line's options: prepare, score, fit, report. Returns the summary."""
    args = parse(argv, RECIPES, "sft", prog="python -m training.sft.train",
                 about="Supervised fine-tuning of a pretrained checkpoint on conversations, with the loss on the "
                       "assistant's replies")
    t_start = time.perf_counter()
    check_method(args)
    p = prepare(args)
    before = score(p, args.recipe.data.max_new_tokens) if not args.resume else {k: float("nan") for k in p.eval_sets}
    say(f"model: {sum(x.numel() for x in p.model.parameters()):,} parameters from {p.base}; "
        f"fine-tuning {args.recipe.train.max_steps} steps into {args.out}")
    result = fit(p, args, method_saver(p.model, p.tokenizer, p.base, lora=False))
    return report(p, args, before, result, t_start)

"""Supervised fine-tuning: teach a pretrained model to answer, with the loss on its answers only.

    python -m training.sft.train --preset tiny                 # 2-core CPU, a few minutes
    python -m training.sft.train --preset tiny --base DIR      # any zoo or Hugging Face Llama 3 / Mixtral directory
    python -m training.sft.train --preset tiny --dataset chats.jsonl   # your own conversations

The base is a checkpoint directory with its tokenizer.json (default for `tiny`: the quick
start's, runs/llama3-tiny, trained first if it is missing). The data is the built-in instruction
set (training/tasks.py) or a chat dataset (training/chat.py: `messages`, ShareGPT or Alpaca
records, a local .json/.jsonl file or a hub name). Conversations are rendered in the base's own
chat format, packed into rows (training/sft/batch.py) and trained with the shared loop on the
assistant's tokens (training/sft/loss.py). Before and after, the held-out questions of each
built-in task are answered greedily and scored by exact match.

This file is also the template of the other methods' train scripts: `prepare` loads the base and
the data, `fit` runs the loop, `report` scores; training/lora/train.py wraps the model in adapters
between `prepare` and `fit`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from architectures import registry
from architectures.utils.files import atomic_write_json
from architectures.utils.command_line import command_line
from training import tasks
from training.chat import ChatFormat, chat_format, load_conversations
from training.cli import Args, checkpoint_saver, parse, pretrained_dir, say
from training.recipes import Recipe
from training.data import get_corpus
from architectures.utils.device import device_label, resolve_device
from training.sft.batch import SFTBatches, encode_all
from training.sft.loss import sft_loss
from training.tokenizer import Tokenizer
from training.trainer import TrainConfig, train

@dataclass
class SFTConfig:
    GROUP = "method"  # the title of these options in --help

    base: str = ""  # checkpoint directory to fine-tune, with its tokenizer.json ("": the quick start's for this preset, trained first if missing)
    pack: bool = True  # pack several conversations per row; attention and positions restart at each one
    chat_format: str = "auto"  # "auto" (from the tokenizer), "zoo" or "llama3"


@dataclass
class ChatDataConfig:
    dataset: str = "builtin"  # "builtin" (training/tasks.py), or a .json/.jsonl chat file or hub dataset name
    arithmetic_examples: int = 8000  # built-in arithmetic conversations to train on
    arithmetic_digits: int = 2  # operands of up to this many digits (3: harder, needs a bigger model or longer run)
    speaker_examples: int = 1000  # built-in "who says this line" conversations to train on (Tiny Shakespeare has 1,088)
    eval_examples: int = 200  # held-out questions per built-in task, answered before and after
    val_conversations: int = 500  # held-out conversations for the loop's validation loss
    max_new_tokens: int = 8  # longest reply generated when scoring


RECIPES = {
    "tiny": Recipe(
        model=SFTConfig(),
        train=TrainConfig(max_steps=1000, batch_size=20, block_size=128, lr=3e-3, min_lr=1e-4, warmup_steps=30,
                          weight_decay=0.0, eval_interval=250, eval_batches=5, log_interval=25),
        data=ChatDataConfig(),
    ),
    "shakespeare": Recipe(
        model=SFTConfig(),
        train=TrainConfig(max_steps=1000, batch_size=64, block_size=256, lr=5e-4, min_lr=5e-5, warmup_steps=50,
                          weight_decay=0.0, eval_interval=200, eval_batches=10, log_interval=50),
        data=ChatDataConfig(arithmetic_examples=100000, arithmetic_digits=3, eval_examples=500),
    ),
}


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
        main(["--preset", preset, "--out", str(path)])
    return path


def policy_and_reference(model: torch.nn.Module, lora: bool, r: int) -> torch.nn.Module | None:
    """For a method that keeps the policy near where it started (DPO, GRPO): the frozen reference, a
    copy of the starting model; or, with `lora`, adapters on every projection and no copy (None): the
    same model with its adapters switched off (`disable_adapters`) is then the reference."""
    if lora:
        from training.lora import ALL_PROJECTIONS, LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=ALL_PROJECTIONS))
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def method_saver(model: torch.nn.Module, tokenizer: Tokenizer, base: Path, lora: bool):
    """The loop's `save_model`: the adapter in PEFT's format with `lora`, else the whole model in its
    family's format; the tokenizer beside either."""
    if lora:
        from training.lora.train import adapter_saver

        return adapter_saver(tokenizer, str(base))
    return checkpoint_saver(registry.package(registry.family_of(model)).save_pretrained, tokenizer)


def write_summary(out: Path, summary: dict, t_start: float, device, written: str) -> dict:
    """summary.json with the total time and the device, and the run's last line."""
    summary = {**summary, "total_s": time.perf_counter() - t_start, "device": device_label(device)}
    atomic_write_json(out / "summary.json", summary)
    say(f"---- {written} in {out}; {summary['total_s']:.0f} s in all ({summary['device']}) ----")
    return summary


def prepare(args: Args) -> Prepared:
    """Load the base model and its tokenizer, render the conversations, pick the held-out sets."""
    cfg, data_cfg = args.recipe.train, args.recipe.data
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
        convs = load_conversations(data_cfg.dataset)
        cut = max(1, min(data_cfg.val_conversations, len(convs) // 10))
        train_convs, val_convs = convs[:-cut], convs[-cut:]
    say(f"data: {len(train_convs):,} training conversations, {len(val_convs):,} validation; chat format {fmt.name}")
    batches = SFTBatches(encode_all(train_convs, fmt, block), encode_all(val_convs, fmt, block, "validation conversation"),
                         block, tokenizer.pad_id if tokenizer.pad_id is not None else 0, args.recipe.model.pack)
    record = {"method": dataclasses.asdict(args.recipe.model), "data": dataclasses.asdict(data_cfg),
              "base": str(base), "model": dataclasses.asdict(model.config)}
    return Prepared(model, base, tokenizer, fmt, batches, eval_sets, record)


def task_examples(name: str, split: str, n: int, text: str, digits: int) -> list:
    return tasks.arithmetic(split, n, max_digits=digits) if name == "arithmetic" else tasks.speaker(text, split, n)


def score(p: Prepared, max_new_tokens: int) -> dict[str, float]:
    return {name: tasks.exact_match(p.model, p.fmt, ex, max_new_tokens) for name, ex in p.eval_sets.items()}


def fit(p: Prepared, args: Args, save_model, loss_fn=sft_loss):
    """The shared loop on the packed conversations."""
    cfg = args.recipe.train
    return train(p.model, loss_fn, p.batches, cfg, args.out, save_model=save_model, config_record=p.record,
                 resume=args.resume, loss_label="train loss (assistant tokens)")


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


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "sft", prog="python -m training.sft.train")
    t_start = time.perf_counter()
    p = prepare(args)
    before = score(p, args.recipe.data.max_new_tokens) if not args.resume else {k: float("nan") for k in p.eval_sets}
    say(f"model: {sum(x.numel() for x in p.model.parameters()):,} parameters from {p.base}; "
        f"fine-tuning {args.recipe.train.max_steps} steps into {args.out}")
    result = fit(p, args, method_saver(p.model, p.tokenizer, p.base, lora=False))
    return report(p, args, before, result, t_start)


if __name__ == "__main__":
    main()

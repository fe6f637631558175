"""The command line that every architecture's train.py shares.

    python -m architectures.<name>.train --preset P [--max-steps N] [--out DIR] [--device D] [--resume]
                                         [--any-config-field VALUE ...]

A preset is a `Recipe`: the model config, the loop's `TrainConfig` and a `DataConfig`.
Every other `--key value` overrides the one field of that name in one of the three
dataclasses, parsed to its declared type, so a typo or a wrong type is a clear error.
The run: corpus -> tokenizer (trained once, cached) -> tokenized splits (cached) ->
model -> the shared loop -> checkpoint in DIR -> full validation pass -> a sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from architectures.common.checkpoint import atomic_write_json
from architectures.common.config import apply_overrides
from inference.generate import generate
from inference.sampling import SamplingParams
from training.data import load_corpus, prepare_data, split_text
from training.lm import evaluate_split, lm_loss
from training.tokenizer import get_tokenizer
from training.device import resolve_device
from training.trainer import TrainConfig, train


@dataclass
class DataConfig:
    dataset: str = "tinyshakespeare"  # "tinyshakespeare", a local .txt/.jsonl file, or a hub dataset name
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE trained on the train split) or "char"
    bpe_vocab_size: int = 512  # BPE vocabulary size, the 5 special tokens included
    sample_prompt: str = "\n"  # text the end-of-run sample continues


@dataclass
class Recipe:
    model: Any  # the architecture's config dataclass (vocab_size is set from the tokenizer)
    train: TrainConfig
    data: DataConfig


def parse(argv: list[str] | None, recipes: dict[str, Recipe], family: str) -> tuple[str, Recipe, Path, bool]:
    parser = argparse.ArgumentParser(prog=f"python -m architectures.{family}.train",
                                     description=f"Train {family} with the zoo's shared loop.")
    parser.add_argument("--preset", default="tiny", help=f"one of {sorted(recipes)}")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<family>-<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    args, rest = parser.parse_known_args(argv)
    if args.preset not in recipes:
        raise SystemExit(f"error: unknown preset '{args.preset}' for {family}; choose one of {sorted(recipes)}")
    recipe = recipes[args.preset]
    overrides: dict[str, dict[str, str]] = {"model": {}, "train": {}, "data": {}}
    fields = {part: {f.name for f in dataclasses.fields(getattr(recipe, part))} for part in overrides}
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--"):
            raise SystemExit(f"error: expected --option, got {flag!r}")
        key, value = (flag[2:].split("=", 1) + [None])[:2]
        name = key.replace("-", "_")
        owners = [part for part in overrides if name in fields[part]]
        is_bool = bool(owners) and isinstance(getattr(getattr(recipe, owners[0]), name), bool)
        if value is None:
            if is_bool and (i + 1 >= len(rest) or rest[i + 1].startswith("--")):
                value = "true"  # a bare boolean flag: --compile
            elif i + 1 >= len(rest):
                raise SystemExit(f"error: {flag} needs a value")
            else:
                value, i = rest[i + 1], i + 1
        if not owners:
            every = sorted("--" + n.replace("_", "-") for part in fields for n in fields[part])
            raise SystemExit(f"error: unknown option {flag}; valid options are --preset, --out, --resume, " + ", ".join(every))
        overrides[owners[0]][name] = value
        i += 1
    if "vocab_size" in overrides["model"]:
        raise SystemExit("error: the model's vocab_size comes from the tokenizer; set --bpe-vocab-size instead")
    try:
        recipe = Recipe(**{part: apply_overrides(getattr(recipe, part), overrides[part], f"preset '{args.preset}'")
                           for part in overrides})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    out = Path(args.out or f"runs/{family}-{args.preset}")
    return args.preset, recipe, out, args.resume


def run(family: str, recipes: dict[str, Recipe], model_cls, save_pretrained: Callable, from_pretrained: Callable,
        argv=None, loss_fn=lm_loss, flops_per_token: Callable | None = None) -> dict:
    """Train `model_cls` on a recipe; returns (and writes to DIR/summary.json) the final figures."""
    preset_name, recipe, out, resume = parse(argv, recipes, family)
    t_start = time.perf_counter()
    data_cfg, train_cfg = recipe.data, recipe.train
    text = load_corpus(data_cfg.dataset)
    train_text, _ = split_text(text)
    # BPE merges are learned from the training split only; a char vocabulary needs every character.
    tokenizer = get_tokenizer(text if data_cfg.tokenizer == "char" else train_text, data_cfg.tokenizer,
                              data_cfg.bpe_vocab_size)
    data = prepare_data(data_cfg.dataset, tokenizer, text=text)
    model_cfg = dataclasses.replace(recipe.model, vocab_size=tokenizer.vocab_size)
    if train_cfg.block_size > model_cfg.max_position_embeddings:
        raise SystemExit(f"error: --block-size {train_cfg.block_size} exceeds the model's max_position_embeddings="
                         f"{model_cfg.max_position_embeddings}; lower --block-size or raise --max-position-embeddings")
    torch.manual_seed(train_cfg.seed)
    model = model_cls(model_cfg)
    t_prep = time.perf_counter() - t_start

    def save_model(m, directory: Path, state_dict=None) -> None:
        save_pretrained(m, directory, state_dict)
        tokenizer.save(directory / "tokenizer.json")

    fpt = flops_per_token(model_cfg, train_cfg.block_size) if flops_per_token else None
    result = train(
        model, loss_fn, lambda split, n, g: data.get_batch(split, n, train_cfg.block_size, g), train_cfg, out,
        save_model=save_model, resume=resume, val_units_per_token=1.0 / data.val_chars_per_token,
        config_record={"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(data_cfg)},
        flops_per_token=fpt,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under torchrun the main process evaluates and samples
    device = resolve_device(train_cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The trained model may be sharded (FSDP2) across processes that have now exited:
        # evaluate the gathered copy the checkpoint holds.
        model = from_pretrained(out, device=device)
    val_loss = evaluate_split(model, data.val, train_cfg.block_size, device=device)
    summary = {
        "family": family, "preset": preset_name, "steps": result.step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss_per_token": val_loss, "val_nats_per_char": val_loss / data.val_chars_per_token,
        "prep_s": t_prep, "train_s": result.elapsed_s, "total_s": time.perf_counter() - t_start,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }
    atomic_write_json(out / "summary.json", summary)
    print(f"validation (whole split): {val_loss:.4f} nats/token = {summary['val_nats_per_char']:.4f} nats/char; "
          f"{summary['parameters']:,} parameters; {summary['total_s']:.0f} s in all ({summary['device']})")
    prompt = tokenizer.encode(data_cfg.sample_prompt)
    n_new = min(200, model_cfg.max_position_embeddings - len(prompt))
    sample = generate(model, prompt, SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n_new, seed=0))
    print("---- sample ----")
    print(tokenizer.decode(prompt + sample))
    print(f"---- checkpoint, metrics.jsonl and loss.png in {out} ----")
    return summary

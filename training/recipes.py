"""Recipes: a preset's model config, the loop's `TrainConfig` and its `DataConfig`, together.

Pretraining uses the same schedule and data for every family, so that the families train on
identical batches and their validation losses compare: `pretraining_recipes(family)` pairs each
of the family's model presets with the schedule of the same name below. A post-training
method's recipe puts its own config (SFTConfig, LoRAConfig, ...) in the model slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from architectures import registry
from training.train_config import TrainConfig


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


# How each pretraining preset trains, whatever the family.
SCHEDULES: dict[str, tuple[TrainConfig, DataConfig]] = {
    "tiny": (  # a 2-core CPU, about 3 minutes for Llama 3
        TrainConfig(max_steps=450, batch_size=32, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                    eval_interval=150, eval_batches=10, log_interval=25),
        DataConfig(tokenizer="bpe", bpe_vocab_size=512),
    ),
    # Tuned on one H100 (notes/llama3.md): Tiny Shakespeare is ~300k BPE tokens, so the 11M-parameter
    # model overfits after ~600 steps; dropout 0.3 and a schedule that ends there give the best validation.
    "shakespeare": (
        TrainConfig(max_steps=600, batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                    beta2=0.99, eval_interval=100, eval_batches=40, log_interval=50),
        DataConfig(tokenizer="bpe", bpe_vocab_size=2048),
    ),
    "gpt2-124m": (  # GPT-2 small's shape, for the training-speed benchmark on a GPU
        TrainConfig(max_steps=2000, batch_size=64, block_size=1024, lr=6e-4, min_lr=6e-5, warmup_steps=100,
                    eval_interval=500, log_interval=50),
        DataConfig(tokenizer="bpe", bpe_vocab_size=8192),
    ),
}


def pretraining_recipes(family: str) -> dict[str, Recipe]:
    """Each of the family's model presets that has a schedule of the same name, as a Recipe."""
    presets = registry.family(family).config.PRESETS
    return {name: Recipe(model=registry.family(family).config.preset(name), train=train, data=data)
            for name, (train, data) in SCHEDULES.items() if name in presets}


"""SFT's options and presets, which LoRA's recipes build on (training/lora/recipes.py).

A recipe's `model` part is the method's options (`SFTConfig`, shown under "method" in --help), its
`train` part the loop's `TrainConfig`, its `data` part the chat data (`ChatDataConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

from training.recipes import Recipe
from training.train_config import TrainConfig


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

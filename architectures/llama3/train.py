"""Train Llama 3 with the zoo's shared loop, data and tokenizer.

    python -m architectures.llama3.train --preset tiny            # 2-core CPU, about 3 minutes
    python -m architectures.llama3.train --preset shakespeare     # one GPU
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from architectures.llama3.config import preset
from training.cli import DataConfig, Recipe, run
from training.lm import lm_loss
from training.trainer import TrainConfig

LOSS_FN = lm_loss  # what the loop minimises (training.benchmarks.throughput times the same step)
LOSS_LABEL = "train loss"  # its name in the terminal

RECIPES = {
    "tiny": Recipe(
        model=preset("tiny"),
        train=TrainConfig(max_steps=450, batch_size=32, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                          eval_interval=150, eval_batches=10, log_interval=25),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=512),
    ),
    # Tuned on one H100 (notes/llama3.md): Tiny Shakespeare is ~300k BPE tokens, so this model
    # overfits after ~600 steps; dropout 0.3 and a schedule that ends there give the best validation.
    "shakespeare": Recipe(
        model=preset("shakespeare"),
        train=TrainConfig(max_steps=600, batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                          beta2=0.99, eval_interval=100, eval_batches=40, log_interval=50),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=2048),
    ),
    "gpt2-124m": Recipe(
        model=preset("gpt2-124m"),
        train=TrainConfig(max_steps=2000, batch_size=64, block_size=1024, lr=6e-4, min_lr=6e-5, warmup_steps=100,
                          eval_interval=500, log_interval=50),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=8192),
    ),
}


@command_line
def main(argv=None) -> dict:
    return run("llama3", RECIPES, argv=argv, loss_fn=LOSS_FN, loss_label=LOSS_LABEL)


if __name__ == "__main__":
    main()

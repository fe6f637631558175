"""Train a Mamba-2 hybrid with the zoo's shared loop, data and tokenizer.

    python -m architectures.mamba2_hybrid.train --preset tiny            # 2-core CPU
    python -m architectures.mamba2_hybrid.train --preset shakespeare     # one GPU

The recipes are Llama 3's with the model swapped, so the families train on identical batches.
The objective is plain cross-entropy. A pattern with MoE layers ("E") balances its experts as
DeepSeek-V3 does, by moving each router's bias after every optimizer step (`on_step`); for a
pattern without them the hook does nothing.
"""

from __future__ import annotations

import dataclasses

from architectures.utils.command_line import command_line
from architectures.deepseek_v3.moe import update_routing_bias
from architectures.llama3.train import RECIPES as LLAMA_RECIPES
from architectures.mamba2_hybrid.config import preset
from training.cli import run
from training.lm import lm_loss

RECIPES = {name: dataclasses.replace(LLAMA_RECIPES[name], model=preset(name)) for name in ("tiny", "shakespeare")}

LOSS_FN = lm_loss  # what the loop minimises (training.benchmarks.throughput times the same step)
LOSS_LABEL = "train loss"  # its name in the terminal


def on_step(step: int, model) -> None:
    """After every optimizer step: b_i += gamma * sign(mean load - load_i) in every MoE layer."""
    update_routing_bias(model)


@command_line
def main(argv=None) -> dict:
    return run("mamba2_hybrid", RECIPES, argv=argv, loss_fn=LOSS_FN, loss_label=LOSS_LABEL, on_step=on_step)


if __name__ == "__main__":
    main()

"""Train Mixtral with the zoo's shared loop, data and tokenizer; the MoE enters only through the loss.

    python -m architectures.mixtral.train --preset tiny            # 2-core CPU
    python -m architectures.mixtral.train --preset shakespeare     # one GPU

`moe_lm_loss` adds the load-balancing and z-losses and returns per-layer expert load and
routing entropy as metrics, which the loop logs to metrics.jsonl (`moe/l{l}/load_e{e}`, ...).
The training loss it logs is therefore cross-entropy plus the weighted auxiliary terms (the
terminal says "train loss (lm + aux)"; metrics.jsonl has `lm_loss`, `aux_loss` and `z_loss`
beside it), while the validation loss is cross-entropy alone, comparable with a dense model's.
The recipes are Llama 3's with the model swapped, so the two train on identical batches.
"""

from __future__ import annotations

import dataclasses

from architectures.utils.command_line import command_line
from architectures.llama3.train import RECIPES as LLAMA_RECIPES
from architectures.mixtral.config import preset
from architectures.mixtral.losses import moe_lm_loss
from training.cli import run

RECIPES = {name: dataclasses.replace(LLAMA_RECIPES[name], model=preset(name)) for name in ("tiny", "shakespeare")}
LOSS_FN = moe_lm_loss  # what the loop minimises (training.benchmarks.throughput times the same step)
LOSS_LABEL = "train loss (lm + aux)"  # its name in the terminal: more than the cross-entropy


@command_line
def main(argv=None) -> dict:
    return run("mixtral", RECIPES, argv=argv, loss_fn=LOSS_FN, loss_label=LOSS_LABEL)


if __name__ == "__main__":
    main()

"""Train Mixtral with the zoo's shared loop, data and tokenizer; the MoE enters only through the loss.

    python -m architectures.mixtral.train --preset tiny            # 2-core CPU
    python -m architectures.mixtral.train --preset shakespeare     # one GPU

`moe_lm_loss` adds the load-balancing and z-losses and returns per-layer expert load and
routing entropy as metrics, which the loop logs to metrics.jsonl (`moe/l{l}/load_e{e}`, ...).
The recipes are Llama 3's with the model swapped, so the two train on identical batches.
"""

from __future__ import annotations

import dataclasses

from architectures.llama3.train import RECIPES as LLAMA_RECIPES
from architectures.mixtral.config import preset
from architectures.mixtral.flops import flops_per_token
from architectures.mixtral.losses import moe_lm_loss
from architectures.mixtral.model import Mixtral
from architectures.mixtral.pretrained import from_pretrained, save_pretrained
from training.cli import run

RECIPES = {name: dataclasses.replace(LLAMA_RECIPES[name], model=preset(name)) for name in ("tiny", "shakespeare")}


def main(argv=None) -> dict:
    return run("mixtral", RECIPES, Mixtral, save_pretrained, from_pretrained, argv, loss_fn=moe_lm_loss, flops_per_token=flops_per_token)


if __name__ == "__main__":
    main()

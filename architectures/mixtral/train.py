"""Train Mixtral with the zoo's shared loop, data and tokenizer; the MoE enters only through the loss.

    python -m architectures.mixtral.train --preset tiny            # 2-core CPU
    python -m architectures.mixtral.train --preset shakespeare     # one GPU

The family's loss (`moe_lm_loss`, architectures/mixtral/losses.py, declared in the registry)
adds the load-balancing and z-losses and returns per-layer expert load and routing entropy as
metrics, which the loop logs to metrics.jsonl (`moe/l{l}/load_e{e}`, ...). The training loss it
logs is therefore cross-entropy plus the weighted auxiliary terms (the terminal says "train loss
(lm + aux)"; metrics.jsonl has `lm_loss`, `aux_loss` and `z_loss` beside it), while the
validation loss is cross-entropy alone, comparable with a dense model's. The schedules are the
same as Llama 3's (training/recipes.py), so the two train on identical batches.
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from training.cli import run


@command_line
def main(argv=None) -> dict:
    return run("mixtral", argv=argv)


if __name__ == "__main__":
    main()

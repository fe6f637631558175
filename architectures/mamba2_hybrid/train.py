"""Train a Mamba-2 hybrid with the zoo's shared loop, data and tokenizer.

    python -m architectures.mamba2_hybrid.train --preset tiny            # 2-core CPU
    python -m architectures.mamba2_hybrid.train --preset shakespeare     # one GPU

The objective is plain cross-entropy. A pattern with MoE layers ("E") balances its experts as
DeepSeek-V3 does, by moving each router's bias after every optimizer step (the family's
`on_step` in the registry); for a pattern without them the hook does nothing. The schedules are
the same as Llama 3's (training/recipes.py), so the families train on identical batches.
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from training.cli import run


@command_line
def main(argv=None) -> dict:
    return run("mamba2_hybrid", argv=argv)


if __name__ == "__main__":
    main()

"""Train Gemma (Gemma 3's shape by default) with the zoo's shared loop, data and tokenizer.

    python -m architectures.gemma.train --preset tiny            # 2-core CPU, a few minutes

The presets pair the model configs of architectures/gemma/config.py with the schedules in
training/recipes.py; the loss, FLOPs formula and checkpoint format are the family's entry in
architectures/registry.py. `--help` lists every option with the chosen preset's value.
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from training.cli import run


@command_line
def main(argv=None) -> dict:
    return run("gemma", argv=argv)


if __name__ == "__main__":
    main()

"""Train Llama 3 with the zoo's shared loop, data and tokenizer.

    python -m architectures.llama3.train --preset tiny            # 2-core CPU, about 3 minutes
    python -m architectures.llama3.train --preset shakespeare     # one GPU
    python -m architectures.llama3.train --preset gpt2-124m       # GPT-2 small's shape, one GPU

The presets pair the model configs of architectures/llama3/config.py with the schedules in
training/recipes.py; the loss, FLOPs formula and checkpoint format are the family's entry in
architectures/registry.py. `--help` lists every option with the chosen preset's value.
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from training.cli import run


@command_line
def main(argv=None) -> dict:
    return run("llama3", argv=argv)


if __name__ == "__main__":
    main()

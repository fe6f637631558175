"""Experiment: does LoRA fall short on the tiny base because the chat tokens' rows are frozen?

    python -m training.lora.experiments.token_rows special --preset tiny --speaker-examples 0
    (modes: none | special | all; every other option is training/lora/train.py's)

The tiny base was pretrained on plain Shakespeare, where <|bos|>, <|eos|>, <|pad|>, <|user|> and
<|assistant|> (ids 0-4) never occur, so their embedding rows, which are also the tied head's
rows, are still random; `apply_lora` freezes them. This runs the LoRA preset with, besides the
adapters, nothing trainable ("none"), those five rows ("special": the other rows' gradients are
zeroed, the idea of PEFT's trainable_token_indices), or the whole embedding ("all"), and prints
the held-out exact match. It saves no checkpoint. notes/lora.md has the measured table.
"""

from __future__ import annotations

import sys

import torch

from architectures.utils.command_line import command_line
from training.cli import parse, say
from training.lora import apply_lora, trainable_parameters
from training.lora.recipes import RECIPES
from training.sft import finetune

MODES = ("none", "special", "all")
SPECIAL_IDS = 5  # the zoo tokenizers' reserved ids 0..4


@command_line
def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODES:
        raise ValueError(f"the first argument is the mode, one of {MODES}")
    mode, argv = argv[0], argv[1:]
    args = parse(argv, RECIPES, "lora", prog="python -m training.lora.experiments.token_rows MODE")
    p = finetune.prepare(args)
    apply_lora(p.model, args.recipe.model.lora())
    emb = p.model.model.embed_tokens.weight
    extra = 0
    if mode != "none":
        emb.requires_grad_(True)
        extra = emb.numel()
        if mode == "special":
            keep = torch.zeros(emb.shape[0], 1, device=emb.device)
            keep[:SPECIAL_IDS] = 1
            emb.register_hook(lambda g: g * keep)  # Adam leaves rows with zero gradient where they are
            extra = SPECIAL_IDS * emb.shape[1]
    adapters, total = trainable_parameters(p.model)
    adapters -= emb.numel() if mode != "none" else 0
    say(f"mode {mode}: {adapters + extra:,} trainable of {total:,} ({(adapters + extra) / total:.2%})")
    finetune.fit(p, args, None)
    after = finetune.score(p, args.recipe.data.max_new_tokens)
    say(f"held-out exact match after training ({mode}): " + ", ".join(f"{k} {v:.1%}" for k, v in after.items()))
    return after


if __name__ == "__main__":
    main()

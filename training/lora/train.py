"""Supervised fine-tuning through LoRA adapters: the base stays frozen, small matrices train.

    python -m training.lora.train --preset tiny                    # LoRA SFT, 2-core CPU, a few minutes
    python -m training.lora.train --preset tiny --use-dora         # DoRA
    python -m training.lora.train --preset tiny --quantize nf4     # QLoRA: adapters over an NF4 base

Everything but the model is SFT's (training/sft/finetune.py: the base checkpoint, the chat data,
packing, the loss, the held-out exact match before and after; the presets in
training/lora/recipes.py are SFT's with the adapters' options): this script wraps the base's
linear layers in adapters (`apply_lora`) between loading and training, and saves the adapter in
PEFT's format (adapter_config.json + adapter_model.safetensors) beside the tokenizer
(`adapter_saver`), so it loads with `load_adapter` here or `PeftModel.from_pretrained` in PEFT.
The loop's optimizer takes the parameters that require gradients, which after `apply_lora` are
the adapters alone: the base gets no gradient and no AdamW moments.
"""

from __future__ import annotations

import time

from architectures.utils.command_line import command_line
from training import checkpointing
from training.checks import check_in
from training.cli import parse, say
from training.lora import apply_lora, trainable_parameters
from training.lora.peft_format import CONFIG_FILE, WEIGHTS_FILE
from training.lora.recipes import RECIPES
from training.posttrain import adapter_saver
from training.sft import finetune


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "lora", prog="python -m training.lora.train",
                 about="Supervised fine-tuning through LoRA adapters (or DoRA, or QLoRA over a quantized base) beside "
                       "a frozen base")
    t_start = time.perf_counter()
    method = args.recipe.model
    # Refused now, NaN included, not after the data is prepared (or as a NaN loss hundreds of steps in).
    check_in("--alpha", method.alpha, "(0, inf)", "the update is scaled by alpha / r; 2 x r is usual")
    check_in("--lora-dropout", method.lora_dropout, "[0, 1)", "dropout on the adapter's input")
    method.lora().validate()  # the rank and the target list
    finetune.check_method(args)
    if args.resume:  # a checkpoint from before the files were listed in it: the adapter's own files
        checkpointing.require_files(args.out, (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"))
    if method.quantize != "none":
        from inference.quantization import WEIGHT_FORMATS, check_format

        check_format(method.quantize, WEIGHT_FORMATS)
    p = finetune.prepare(args)
    if method.quantize != "none":
        from inference.quantized_linear import quantize

        quantize(p.model, method.quantize)
        say(f"base: linear layers quantized to {method.quantize} (frozen)")
    apply_lora(p.model, method.lora())
    trainable, total = trainable_parameters(p.model)
    say(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}): adapters r={method.r} on "
        f"{method.target_modules}" + (" with DoRA magnitudes" if method.use_dora else ""))
    before = (finetune.score(p, args.recipe.data.max_new_tokens) if not args.resume
              else {k: float("nan") for k in p.eval_sets})
    result = finetune.fit(p, args, adapter_saver(p.tokenizer, str(p.base)))
    return finetune.report(p, args, before, result, t_start,
                           extra={"trainable_parameters": trainable, "total_parameters": total})


if __name__ == "__main__":
    main()

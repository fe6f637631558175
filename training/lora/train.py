"""Supervised fine-tuning through LoRA adapters: the base stays frozen, small matrices train.

    python -m training.lora.train --preset tiny                    # LoRA SFT, 2-core CPU, a few minutes
    python -m training.lora.train --preset tiny --use-dora         # DoRA
    python -m training.lora.train --preset tiny --quantize nf4     # QLoRA: adapters over an NF4 base

Everything but the model is SFT's (training/sft/train.py: the base checkpoint, the chat data,
packing, the loss, the held-out exact match before and after): this script wraps the base's
linear layers in adapters (`apply_lora`) between loading and training, and saves the adapter in
PEFT's format (adapter_config.json + adapter_model.safetensors) beside the tokenizer, so it
loads with `load_adapter` here or `PeftModel.from_pretrained` in PEFT. The loop's optimizer takes
the parameters that require gradients, which after `apply_lora` are the adapters alone: the
base gets no gradient and no AdamW moments.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from architectures.utils.command_line import command_line
from training.cli import parse, say
from training.recipes import Recipe
from training.lora import ALL_PROJECTIONS, LoRAConfig, apply_lora, save_adapter, trainable_parameters
from training.sft import train as sft


@dataclass
class LoRASFTConfig(sft.SFTConfig):
    r: int = 8  # rank of each adapter's update B A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input
    target_modules: str = ",".join(ALL_PROJECTIONS)  # comma-separated module-name suffixes to adapt
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # DoRA: also learn each output row's magnitude
    quantize: str = "none"  # "nf4", "int8" or "int4": quantize the frozen base first (QLoRA with nf4)

    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.lora_dropout,
                          target_modules=[t.strip() for t in self.target_modules.split(",") if t.strip()],
                          use_rslora=self.use_rslora, use_dora=self.use_dora)


def lora_recipe(recipe: Recipe, **train_changes) -> Recipe:
    return Recipe(model=LoRASFTConfig(**dataclasses.asdict(recipe.model)),
                  train=dataclasses.replace(recipe.train, **train_changes), data=recipe.data)


# The same data and steps as full SFT, so the two compare step for step; adapters take a larger
# learning rate (they start at zero and move a low-rank slice of the weights).
RECIPES = {
    "tiny": lora_recipe(sft.RECIPES["tiny"], lr=2e-3, min_lr=1e-4),
    "shakespeare": lora_recipe(sft.RECIPES["shakespeare"], lr=2e-3, min_lr=2e-4),
}


def adapter_saver(tokenizer, base: str):
    """The loop's `save_model`: the adapter in PEFT's format, and the tokenizer beside it."""
    def save_model(model, directory, state_dict=None) -> None:
        save_adapter(model, directory, base_model_name_or_path=base)
        tokenizer.save(directory / "tokenizer.json")
    return save_model


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "lora", prog="python -m training.lora.train")
    t_start = time.perf_counter()
    method = args.recipe.model
    method.lora().validate()  # a bad rank or target list fails now, not after the data is prepared
    if method.quantize != "none":
        from inference.quantization import WEIGHT_FORMATS, check_format

        check_format(method.quantize, WEIGHT_FORMATS)
    p = sft.prepare(args)
    if method.quantize != "none":
        from inference.quantized_linear import quantize

        quantize(p.model, method.quantize)
        say(f"base: linear layers quantized to {method.quantize} (frozen)")
    apply_lora(p.model, method.lora())
    trainable, total = trainable_parameters(p.model)
    say(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}): adapters r={method.r} on "
        f"{method.target_modules}" + (" with DoRA magnitudes" if method.use_dora else ""))
    before = sft.score(p, args.recipe.data.max_new_tokens) if not args.resume else {k: float("nan") for k in p.eval_sets}
    result = sft.fit(p, args, adapter_saver(p.tokenizer, str(p.base)))
    return sft.report(p, args, before, result, t_start,
                      extra={"trainable_parameters": trainable, "total_parameters": total})


if __name__ == "__main__":
    main()

"""LoRA SFT's options and presets: SFT's (training/sft/recipes.py) plus the adapters'.

The presets take SFT's data and steps, so the two compare step for step; adapters take a larger
learning rate (they start at zero and move a low-rank slice of the weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from training.lora.lora import ALL_PROJECTIONS, LoRAConfig
from training.recipes import Recipe
from training.sft import recipes as sft


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


RECIPES = {
    "tiny": lora_recipe(sft.RECIPES["tiny"], lr=2e-3, min_lr=1e-4),
    "shakespeare": lora_recipe(sft.RECIPES["shakespeare"], lr=2e-3, min_lr=2e-4),
}

"""Train DeepSeek-V3 with the zoo's shared loop, data and tokenizer.

    python -m architectures.deepseek_v3.train --preset tiny            # 2-core CPU
    python -m architectures.deepseek_v3.train --preset shakespeare     # one GPU

The objective is cross-entropy: DeepSeek-V3 balances its experts mainly without an auxiliary
loss, by moving each router's bias after every optimizer step (`update_routing_bias`), which is
`on_step`, the hook `training.trainer.train` calls after each step. `--seq-aux-loss-alpha A`
(0 by default) adds the report's complementary sequence-wise balance loss, alpha times the sum
over MoE layers of `sequence_balance_loss`, in training only: the validation loss stays pure
cross-entropy, and metrics.jsonl then carries `lm_loss` and `seq_balance_loss` beside the total.
`deepseek_lm_loss` logs each MoE layer's load imbalance (most-loaded expert's tokens over the
mean) so metrics.jsonl shows how balanced the experts are.
The recipes are Llama 3's with the model swapped, so the two train on identical batches.
"""

from __future__ import annotations

import dataclasses

import torch

from architectures.utils.command_line import command_line
from architectures.deepseek_v3.config import preset
from architectures.deepseek_v3.moe import Router, take_balance_losses, update_routing_bias
from architectures.llama3.train import RECIPES as LLAMA_RECIPES
from architectures.utils.wrappers import unwrap
from training.cli import run
from training.lm import lm_loss

RECIPES = {name: dataclasses.replace(LLAMA_RECIPES[name], model=preset(name)) for name in ("tiny", "shakespeare")}


def deepseek_lm_loss(model, batch):
    """Cross-entropy (+ alpha * sum over MoE layers of the sequence-wise balance loss, in training
    with seq_aux_loss_alpha > 0), and `moe/l{i}/max_load`: max / mean of layer i's expert loads
    since the last bias update (or reset)."""
    loss, metrics = lm_loss(model, batch)
    inner = unwrap(model)
    # The routers keep their affinities only in training with alpha > 0; the validation loss the
    # loop reports (eval mode) is therefore always pure cross-entropy.
    balance = take_balance_losses(inner) if inner.training else {}
    if balance:
        # Summed over layers, not averaged: each MoE layer carries its own term alpha * sum_i f_i P_i
        # as in the report, so alpha pulls on every router equally hard whatever the depth.
        total = torch.stack(list(balance.values())).sum()
        metrics["lm_loss"] = loss.detach()
        metrics["seq_balance_loss"] = total.detach()  # = the number of MoE layers when balanced
        for i, value in balance.items():
            metrics[f"moe/l{i}/seq_balance"] = value.detach()  # 1 when balanced
        loss = loss + inner.config.seq_aux_loss_alpha * total
    with torch.no_grad():
        for i, layer in enumerate(inner.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if isinstance(gate, Router) and gate.load.sum() > 0:
                metrics[f"moe/l{i}/max_load"] = gate.load.max() / gate.load.mean()
    return loss, metrics


def on_step(step: int, model) -> None:
    """After every optimizer step: b_i += gamma * sign(mean load - load_i) in every MoE layer."""
    update_routing_bias(model)


LOSS_FN = deepseek_lm_loss  # what the loop minimises (training.benchmarks.throughput times the same step)
LOSS_LABEL = "train loss"  # its name in the terminal


@command_line
def main(argv=None) -> dict:
    return run("deepseek_v3", RECIPES, argv=argv, loss_fn=LOSS_FN, loss_label=LOSS_LABEL, on_step=on_step)


if __name__ == "__main__":
    main()

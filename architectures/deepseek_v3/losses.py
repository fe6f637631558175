"""What training adds to DeepSeek-V3's forward pass: its loss terms and its per-step hook.

DeepSeek-V3 balances its experts mainly without an auxiliary loss, by moving each router's bias
after every optimizer step (`update_routing_bias`, architectures/deepseek_v3/moe.py): that is
`bias_update_step`, the family's `on_step`. `seq_aux_loss_alpha > 0` adds the report's
complementary sequence-wise balance loss, alpha times the sum over MoE layers of
`sequence_balance_loss`, in training only: the validation loss stays pure cross-entropy.
Every MoE layer's load imbalance (most-loaded expert's tokens over the mean) is logged as
`moe/l{i}/max_load`, so metrics.jsonl shows how balanced the experts are.
"""

from __future__ import annotations

import torch

from architectures.common.loss import lm_loss
from architectures.deepseek_v3.moe import Router, take_balance_losses, update_routing_bias
from architectures.utils.wrappers import unwrap


def deepseek_aux_loss(model) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """alpha * sum over MoE layers of the sequence-wise balance loss of the forward pass just run
    (None unless training with seq_aux_loss_alpha > 0), and `moe/l{i}/max_load`: max / mean of
    layer i's expert loads since the last bias update (or reset)."""
    inner = unwrap(model)
    metrics: dict[str, torch.Tensor] = {}
    aux = None
    # The routers keep their affinities only in training with alpha > 0; the validation loss the
    # loop reports (eval mode) is therefore always pure cross-entropy.
    balance = take_balance_losses(inner) if inner.training else {}
    if balance:
        # Summed over layers, not averaged: each MoE layer carries its own term alpha * sum_i f_i P_i
        # as in the report, so alpha pulls on every router equally hard whatever the depth.
        total = torch.stack(list(balance.values())).sum()
        metrics["seq_balance_loss"] = total.detach()  # = the number of MoE layers when balanced
        for i, value in balance.items():
            metrics[f"moe/l{i}/seq_balance"] = value.detach()  # 1 when balanced
        aux = inner.config.seq_aux_loss_alpha * total
    with torch.no_grad():
        for i, layer in enumerate(inner.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if isinstance(gate, Router) and gate.load.sum() > 0:
                metrics[f"moe/l{i}/max_load"] = gate.load.max() / gate.load.mean()
    return aux, metrics


def deepseek_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DeepSeek-V3's pretraining loss: cross-entropy plus `deepseek_aux_loss`'s terms."""
    loss, metrics = lm_loss(model, batch)
    aux, extra = deepseek_aux_loss(model)
    if aux is not None:
        metrics["lm_loss"] = loss.detach()
        loss = loss + aux
    metrics.update(extra)
    return loss, metrics


def bias_update_step(step: int, model) -> None:
    """The loop's `on_step` after every optimizer step: b_i += gamma * sign(mean load - load_i) in
    every MoE layer (DeepSeek-V3's, and Nemotron-H's, which routes the same way)."""
    update_routing_bias(model)

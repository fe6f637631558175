"""The two auxiliary losses of a sparse MoE, and the language-model loss that adds them.

Load balancing (Switch Transformer: "Switch Transformers: Scaling to Trillion Parameter Models
with Simple and Efficient Sparsity", 2021, arXiv:2101.03961, eqs. 4-6; used by Mixtral):

    L_balance = E * sum_e f_e * P_e
    f_e = (top-k assignments to expert e) / N     (sums to k over e, not to 1)
    P_e = mean over tokens of softmax(logits)_e   (sums to 1)

f is a count, so it has no gradient; the loss trains the router through P, pushing probability
away from over-used experts. A perfectly balanced router has f_e = k/E and P_e = 1/E, so
L_balance = E * E * (k/E) * (1/E) = k: its floor is about k, not 1, because f counts k
assignments per token (Switch, with k = 1, gets 1). A router collapsed onto k experts gives E.

`load_balancing_loss` computes it exactly as transformers' `load_balancing_loss_func`: f and P
pooled over the tokens of ALL layers before the product. That only balances how often each
expert *index* is used summed over layers; layer 2 may send everything to expert 0 if layer 3
avoids it. With `per_layer=True` each layer's loss is computed on its own and the losses are
averaged (Switch adds one loss per layer; the mean keeps alpha's scale), so every layer must
balance. notes/mixtral.md shows the difference measured (architectures/mixtral/experiments/dense_vs_moe.py).

Router z-loss (ST-MoE: "ST-MoE: Designing Stable and Transferable Sparse Expert Models", 2022,
arXiv:2202.08906, eq. 5): L_z = mean over tokens (and layers) of logsumexp(logits)^2. It keeps
the router's logits small, where the fp32/bf16 exponentials in its softmax stay accurate.
Tested against transformers' `router_z_loss_func` (Switch Transformers implementation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.utils.wrappers import unwrap


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of expert_ids name each expert, as floats (E,). Unlike bincount, the output
    size does not depend on the data, so a GPU never waits for the host here."""
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, device=ids.device).index_add_(0, ids, torch.ones(ids.shape, device=ids.device))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        per_layer: bool = False) -> torch.Tensor:
    """router_logits: one (N, E) tensor per layer -> scalar. Balanced routing gives about top_k.
    per_layer=False is transformers' pooled formulation; True averages each layer's own loss."""
    if per_layer:
        return torch.stack([load_balancing_loss((layer,), num_experts, top_k) for layer in router_logits]).mean()
    logits = torch.cat(router_logits, dim=0).float()  # (L*N, E): every layer's tokens pooled
    probs = logits.softmax(dim=-1)  # (L*N, E)
    chosen = probs.topk(top_k, dim=-1).indices  # (L*N, k)
    rows = logits.shape[0]
    f = expert_counts(chosen, num_experts) / rows  # (E,) sums to k
    P = probs.sum(dim=0) / rows  # (E,) sums to 1
    return num_experts * torch.sum(f * P)


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """mean over all layers' tokens of logsumexp(logits)^2 -> scalar."""
    logits = torch.cat(router_logits, dim=0).float()  # (L*N, E)
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@torch.no_grad()
def routing_metrics(router_logits: tuple[torch.Tensor, ...], top_k: int) -> dict[str, torch.Tensor]:
    """Per layer l: the share of the N*k assignments each expert e received (`moe/l{l}/load_e{e}`,
    1/E each when balanced), the entropy of that load in nats (`moe/l{l}/load_entropy`, ln E when
    balanced, ln k when k experts take everything) and the mean entropy of a token's router
    distribution (`moe/l{l}/router_entropy`, how undecided the router is)."""
    metrics: dict[str, torch.Tensor] = {}
    for layer, logits in enumerate(router_logits):
        probs = logits.float().softmax(dim=-1)  # (N, E)
        E = probs.shape[-1]
        load = expert_counts(probs.topk(top_k, dim=-1).indices, E)
        load = load / load.sum()  # (E,)
        for e in range(E):
            metrics[f"moe/l{layer}/load_e{e}"] = load[e]
        metrics[f"moe/l{layer}/load_entropy"] = -(load * load.clamp_min(1e-12).log()).sum()
        metrics[f"moe/l{layer}/router_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return metrics


def router_aux_terms(cfg, router_logits: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * L_balance + beta * L_z over one forward's router logits (one (N, E) per layer), and
    the metrics that carry each term and the routing statistics of `routing_metrics`."""
    balance = load_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok,
                                  per_layer=cfg.router_aux_loss_per_layer)
    z = router_z_loss(router_logits)
    metrics = {"aux_loss": balance.detach(), "z_loss": z.detach()}
    metrics.update(routing_metrics(router_logits, cfg.num_experts_per_tok))
    return cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z, metrics


def moe_aux_loss(model) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The auxiliary terms of the forward pass the model just ran, read from each MoE layer's
    `router_logits`: what a post-training method adds to its own loss (`Family.aux_loss`).
    None in eval mode, where only the method's own loss counts."""
    inner = unwrap(model)
    if not inner.training:
        return None, {}
    return router_aux_terms(inner.config, tuple(layer.mlp.router_logits for layer in inner.model.layers))


def moe_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy + alpha * L_balance + beta * L_z: Mixtral's pretraining loss.

    In eval mode the auxiliary terms are left out, so the validation loss the loop reports is
    pure cross-entropy and compares with a dense model's. The metrics (averaged and logged by
    the loop) carry each term and the routing statistics of `routing_metrics`.
    """
    x, y = batch  # (B, T), (B, T)
    logits, router_logits = model(x, output_router_logits=True)  # (B, T, V), L x (B*T, E)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    if not model.training:
        return ce, {}
    aux, metrics = router_aux_terms(unwrap(model).config, router_logits)
    return ce + aux, {"lm_loss": ce.detach(), **metrics}

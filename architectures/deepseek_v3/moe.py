"""DeepSeekMoE: fine-grained routed experts, shared experts, sigmoid routing limited to a few
expert groups, and load balancing without an auxiliary loss.

Papers: "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language
Models" (2024, arXiv:2401.06066); "DeepSeek-V3 Technical Report" (2024, arXiv:2412.19437,
section 2.1.2), whose equations are quoted below; the bias rule is from "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts" (2024, arXiv:2408.15664). Reference implementation
it is tested against: transformers' `DeepseekV3MoE` / `DeepseekV3TopkRouter`
(tests/architectures/deepseek_v3/test_matches_transformers.py).

    h' = h + sum_{i<N_s} FFN_i^(s)(h) + sum_{i<N_r} g_i FFN_i^(r)(h)
    s_i = sigmoid(u^T e_i)                         affinity of the token to routed expert i
    chosen = TopK(s_i + b_i, K_r)                  the bias b only CHOOSES ...
    g_i = s_i / sum_{j in chosen} s_j, i in chosen  ... the weights use the unbiased s
    (times routed_scaling_factor)

The routed experts are the zoo's stacked SwiGLU experts with their grouped dispatch
(`StackedExperts`, architectures/common/moe.py); the N_s shared experts are one SwiGLU of width N_s * F.

Optionally (`seq_aux_loss_alpha` > 0), the report's complementary sequence-wise balance loss,
per MoE layer and per sequence of T tokens (eqs. 17-20):
    L_Bal = alpha * sum_i f_i P_i
    f_i = N_r / (K_r T) * sum_t 1[i among token t's chosen K_r]   (1 for every i when balanced)
    P_i = (1/T) sum_t s'_i,t,  s'_i,t = s_i,t / sum_j s_j,t       (the affinities normalised over all N_r)
f is a count and has no gradient; the loss trains the router through P, pushing affinity away
from the experts this sequence overloads. Balanced routing gives sum_i f_i P_i = 1.

Symbols: N tokens (B*T), D hidden_size, F moe_intermediate_size, E = N_r routed experts,
G n_group, k = K_r experts per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from architectures.common.moe import StackedExperts
from architectures.deepseek_v3.config import DeepseekV3Config
from architectures.llama3.model import SwiGLU


def group_limited_topk(scores: torch.Tensor, bias: torch.Tensor, k: int, n_group: int,
                       topk_group: int) -> torch.Tensor:
    """The experts each token goes to: the top k of s + b, among the experts of its best topk_group groups.

    scores: (N, E) sigmoid affinities; bias: (E,) -> expert ids (N, k). A group's score is the sum
    of its two best biased affinities (DeepSeek-V3's rule): it limits how many groups (devices, in
    DeepSeek's deployment) one token's experts span."""
    N, E = scores.shape
    choice = scores + bias  # (N, E) biased, for choosing only
    if n_group > 1:
        grouped = choice.view(N, n_group, E // n_group)  # (N, G, E/G)
        group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)  # (N, G)
        best = group_scores.topk(topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
    return choice.topk(k, dim=-1).indices  # (N, k)


class Router(nn.Module):
    """Sigmoid affinities, group-limited top-k with the balancing bias, weights from the unbiased scores.

    Named as transformers names it (`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`), so
    checkpoints load by name. The bias is a buffer, not a parameter: no gradient reaches it;
    `update_routing_bias` moves it between optimizer steps from the expert loads counted here."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))  # (E, D): the centroids e_i
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))  # (E,) b
        # Tokens routed to each expert since the last bias update (training only; not saved). A plain
        # tensor, not a buffer: DDP broadcasts rank 0's buffers before every forward, which would
        # overwrite this rank's count of its earlier accumulation micro-batches.
        self.load = torch.zeros(cfg.n_routed_experts)  # (E,)
        # What the sequence-wise balance loss reads, from the last training forward, when the layer that
        # owns this router asks for it (`keep_routing`; DeepSeekMoE does when seq_aux_loss_alpha > 0):
        # the affinities s (B, T, E) and the chosen experts (B, T, k), still attached to the graph.
        self.keep_routing = False
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_buffers(self) -> None:
        self.load.zero_()

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Centroids N(0, std), no bias, no load counted yet."""
        nn.init.normal_(self.weight, std=std)
        self.e_score_correction_bias.zero_()
        self.load.zero_()

    def _apply(self, fn, recurse=True):
        # Keep the bias in fp32 whatever dtype the model is cast to (transformers keeps it in fp32
        # too): in bf16 a bias step of gamma = 0.001 would vanish next to a bias of 0.5.
        kept = self._buffers["e_score_correction_bias"]
        super()._apply(fn, recurse)
        new = self._buffers["e_score_correction_bias"]
        if new.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = kept.to(device=new.device, dtype=torch.float32)
        # The load is no buffer, so it moves here, with the module, and stays fp32 (counts of a meta
        # model, built to be loaded, start again at 0).
        self.load = (torch.zeros(self.load.shape, device=new.device) if self.load.is_meta
                     else self.load.to(device=new.device, dtype=torch.float32))
        return self

    def forward(self, x: torch.Tensor, seq_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, D) -> weights (N, k) fp32, expert ids (N, k). seq_shape: (B, T) with B * T = N, the
        sequences the tokens come from, for the sequence-wise balance loss (None: one sequence)."""
        cfg = self.cfg
        # Scores in fp32 even under autocast: bf16 rounding would change which experts are chosen.
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E) s
        idx = group_limited_topk(scores, self.e_score_correction_bias.float(), cfg.num_experts_per_tok,
                                 cfg.n_group, cfg.topk_group)  # (N, k)
        w = scores.gather(1, idx)  # (N, k) the unbiased s of the chosen experts
        if cfg.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            self.load += torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).to(self.load.dtype)
            if self.keep_routing:
                B, T = seq_shape if seq_shape is not None else (1, x.shape[0])
                self.routing = scores.view(B, T, -1), idx.view(B, T, -1)  # (B, T, E), (B, T, k)
        return w * cfg.routed_scaling_factor, idx


class DeepseekMoE(nn.Module):
    """MoE(x) = routed(x) + shared(x): names `gate` (router), `experts` (stacked routed experts),
    `shared_experts` (a SwiGLU of width n_shared_experts * moe_intermediate_size), as transformers."""

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.gate.keep_routing = cfg.seq_aux_loss_alpha > 0  # the balance loss reads the last routing
        self.experts = StackedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D): routing is per token
        w, idx = self.gate(flat, seq_shape=(B, T))  # (N, k), (N, k)
        out = self.experts(flat, w, idx).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i of each sequence, averaged over the sequences: one MoE layer's L_Bal / alpha.

    scores: (B, T, E) sigmoid affinities s; idx: (B, T, k) the experts each token went to -> scalar.
    f counts the experts the tokens were really sent to, i.e. chosen with the bias b when the bias
    update runs beside the loss (the report writes TopK of s; with b = 0 the two are the same)."""
    B, T, E = scores.shape
    k = idx.shape[-1]
    chosen = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, idx.reshape(B, T * k), torch.ones(B, T * k, device=scores.device))  # (B, E) tokens of b sent to i
    f = chosen * (E / (k * T))  # (B, E) f_i = N_r / (K_r T) sum_t 1[i chosen for t]
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E) P_i = (1/T) sum_t s'_i,t
    return (f * P).sum(dim=-1).mean()  # sum over experts, mean over the B sequences


def take_balance_losses(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: `sequence_balance_loss`} of every MoE layer whose router kept its last training
    forward (only when seq_aux_loss_alpha > 0), clearing what it read so no step reads it twice."""
    losses = {}
    for module in model.modules():
        if isinstance(module, DeepseekMoE) and module.gate.routing is not None:
            losses[module.layer_idx] = sequence_balance_loss(*module.gate.routing)
            module.gate.routing = None
    return losses


@torch.no_grad()
def update_routing_bias(model: nn.Module, gamma: float | None = None) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), per MoE layer.

    An overloaded expert's bias goes down and an idle one's up, so the top-k choice drifts
    toward balance without a loss term that would pull the gradient away from language
    modelling. Call it after each optimizer step (the training loop's `on_step(step, model)`);
    the loads are the tokens routed since the previous call, then reset. gamma defaults to the
    config's routing_bias_update_speed. Under torch.distributed (DDP, FSDP2) the loads are first
    summed over all ranks, so every rank sees the global batch's loads and applies the same update
    (with each rank's own count, the biases would drift apart, or DDP would keep rank 0's)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if routers and dist.is_available() and dist.is_initialized():
        loads = torch.cat([r.load for r in routers])  # (layers * E,): one collective for every layer
        dist.all_reduce(loads, op=dist.ReduceOp.SUM)
        for r, summed in zip(routers, loads.split([r.load.numel() for r in routers])):
            r.load.copy_(summed)
    for r in routers:
        g = r.cfg.routing_bias_update_speed if gamma is None else gamma
        r.e_score_correction_bias += g * torch.sign(r.load.mean() - r.load)
        r.load.zero_()

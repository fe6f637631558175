"""Mixtral: Llama 3 with each feed-forward replaced by a sparse mixture of SwiGLU experts.

Paper: "Mixtral of Experts" (2024, arXiv:2401.04088); the top-k router comes from
"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer" (2017,
arXiv:1701.06538). Reference implementation it is tested against: transformers'
`MixtralForCausalLM` (tests/architectures/mixtral/test_matches_transformers.py).

Attention and RoPE are Llama 3's, imported; the decoder stack is the zoo's shared one
(architectures/common/decoder.py); this file adds only the MoE layer, which `Mixtral.make_ffn`
puts in every layer. Parameter names are those of
transformers 5's in-memory model (`mlp.gate.weight`, `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); pretrained.py converts the per-expert layout published on the hub.

Symbols: N tokens in the call (B*T), D hidden_size, F intermediate_size (one expert's
width), E num_local_experts, k num_experts_per_tok, M = N*k (token, expert) pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from architectures.common.decoder import CausalLM
from architectures.common.kernels import silu_and_mul
from architectures.llama3.model import Attention, RotaryEmbedding
from architectures.mixtral.config import MixtralConfig


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits); keep the k largest; renormalise them to sum to 1.

    router_logits: (N, E) -> weights (N, k) in fp32, expert ids (N, k). The softmax runs in
    fp32 because bf16's 8-bit mantissa can flip which experts are the top k.
    """
    probs = router_logits.float().softmax(dim=-1)  # (N, E)
    top_w, top_idx = probs.topk(k, dim=-1)  # (N, k), (N, k)
    return top_w / top_w.sum(dim=-1, keepdim=True), top_idx


def _can_use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped GEMM (`F.grouped_mm`, torch >= 2.10; `torch._grouped_mm` before) is used on
    CUDA in bf16, the training and benchmark dtype: sm80+ from torch 2.9, sm90 only before.
    Elsewhere the per-expert loop runs: as fast on a CPU, and it works in every dtype."""
    if not x.is_cuda or not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    if dtype != torch.bfloat16 or (not autocast and w.dtype != dtype):
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    newer = hasattr(F, "grouped_mm") or tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
    # The kernel reads rows with 16-byte vector loads, so every row stride must be a multiple of 16 bytes.
    aligned = all(s * dtype.itemsize % 16 == 0 for s in (x.shape[-1], w.shape[-1], w.shape[-2]))
    return (major >= 8 if newer else major == 9) and aligned


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ends[e-1]:ends[e] of x go through expert e in ONE kernel launch: y_rows = x_rows @ w[e]^T.

    x: (M, in) sorted by expert; w: (E, out, in); ends: (E,) exclusive row offsets -> (M, out).
    """
    if torch.is_autocast_enabled(x.device.type):
        # The grouped GEMM is not on autocast's list; cast as autocast would cast a matmul.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return gmm(x, w.transpose(1, 2), offs=ends.to(torch.int32))  # (E, in, out) view, no copy


class _PermuteRows(torch.autograd.Function):
    """out = y[perm] for a permutation perm: a gather forward and, since each row goes to exactly one
    place, a gather by the inverse permutation backward (autograd's default for y[idx] would scatter-add
    with a sort, as it must for indices that repeat)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return y[perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def permute_rows(y: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """y[perm] along dim 0, for perm a permutation of range(len(y)) and inverse its inverse (y = out[inverse])."""
    return _PermuteRows.apply(y, perm, inverse)


class MixtralExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors, so they can run as one grouped GEMM.

    gate_up_proj[e] = [W_gate; W_up] (hub names w1; w3), (2F, D): one GEMM computes both halves.
    down_proj[e] = W_down (hub name w2), (D, F).
    """

    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        E, D, Fd = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fd, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fd))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU_e(x) = W_down (silu(W_gate x) * W_up x). x: (n, D) -> (n, D)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (n, F) each
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch: x (N, D), top_w / top_idx (N, k) -> sum_j top_w[:, j] * expert_{top_idx[:, j]}(x)."""
        N, k = top_idx.shape
        out_dtype = x.dtype
        # 1. Sort the M = N*k (token, expert) pairs by expert: each expert's tokens become one slice.
        experts_sorted, order = top_idx.reshape(-1).sort(stable=True)  # (M,), (M,)
        token = order // k  # (M,) the token each sorted pair came from
        grouped = _can_use_grouped_mm(x, self.gate_up_proj)
        if grouped and torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))  # cast before the gather: half the bytes to copy
        xs = x[token]  # (M, D) gathered: expert 0's tokens, then expert 1's, ...
        # 2. Each expert runs once, on its slice.
        if grouped:
            # GPU: the slice boundaries stay on the device, and a grouped GEMM does all experts at once.
            ends = torch.searchsorted(experts_sorted, torch.arange(self.num_experts, device=x.device), right=True)
            h = silu_and_mul(grouped_gemm(xs, self.gate_up_proj, ends))  # (M, F): silu(gate) * up, one pass
            y = grouped_gemm(h, self.down_proj, ends)  # (M, D)
        else:
            # CPU: one matmul chain per expert on its contiguous slice (the sizes cost one host read).
            sizes = torch.bincount(experts_sorted, minlength=self.num_experts).tolist()
            y = torch.cat([self.expert(e, xe) for e, xe in enumerate(xs.split(sizes))])  # (M, D)
        # 3. Un-sort, then each token's router-weighted sum of its k expert outputs as one batched
        # product (N, 1, k) @ (N, k, D), accumulated in fp32 inside the matmul even from bf16 rows.
        # Fixed-order sums, not index_add_: atomic adds on a GPU would make training non-deterministic.
        unsorted = permute_rows(y, torch.argsort(order), order)  # (M, D), row j*k+s = token j's s-th expert
        weights = top_w.view(N, 1, k).to(y.dtype)  # (N, 1, k)
        return torch.bmm(weights, unsorted.view(N, k, -1)).view(N, -1).to(out_dtype)  # (N, D)


class SparseMoE(nn.Module):
    """MoE(x) = sum over the top-k experts e of x of  g_e(x) * SwiGLU_e(x),
    g = renormalised top-k of softmax(W_router x).

    Replaces Llama's SwiGLU in every layer. The router is named `gate` (transformers' name; not
    SwiGLU's gate). Its last logits are kept in `router_logits` for the auxiliary losses.
    """

    def __init__(self, cfg: MixtralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = MixtralExperts(cfg)
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D): routing is per token, the sequence plays no part
        logits = self.gate(x)  # (N, E)
        self.router_logits = logits
        top_w, top_idx = route(logits, self.top_k)  # (N, k), (N, k)
        return self.experts(x, top_w, top_idx).view(B, T, D)

    def nonfinite_logits_error(self) -> FloatingPointError:
        """The error for NaN/inf router logits, telling a broken router from broken inputs to it."""
        bad = ~torch.isfinite(self.router_logits)
        n_bad_tokens = int(bad.any(dim=-1).sum())
        n_bad_weights = int((~torch.isfinite(self.gate.weight)).sum())
        cause = (f"its weight model.layers.{self.layer_idx}.mlp.gate.weight holds {n_bad_weights} NaN/inf values; "
                 f"the checkpoint or the training run that wrote it is broken" if n_bad_weights else
                 "its weights are finite, so the hidden states reaching it already were not "
                 "(an earlier layer or a diverged training run)")
        return FloatingPointError(
            f"the router of layer {self.layer_idx} produced NaN/inf logits for {n_bad_tokens} of "
            f"{bad.shape[0]} tokens: {cause}"
        )


def masked_moe_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The slow, obvious MoE: every expert on every token, masked by the routing weights.

    E/k times the FLOPs of the grouped dispatch; kept as the test oracle and the benchmark's
    naive baseline. x: (B, T, D) -> (B, T, D).
    """
    B, T, D = x.shape
    x = x.reshape(B * T, D)
    top_w, top_idx = route(moe.gate(x), moe.top_k)  # (N, k)
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(moe.experts.num_experts):
        weight = (top_w * (top_idx == e)).sum(dim=-1)  # (N,) zero for tokens not routed to e
        out = out + weight[:, None] * moe.experts.expert(e, x)  # (N, D): expert e on ALL tokens
    return out.to(x.dtype).view(B, T, D)


class Mixtral(CausalLM):
    """Decoder-only sparse MoE language model: input_ids (B, T) -> logits (B, T, V).

    Every layer is Llama 3's grouped-query attention followed by a sparse MoE.
    `model(ids, output_router_logits=True)` returns (logits, router_logits), a tuple with one
    (B*T, E) tensor per layer, which is what the load-balancing and z-losses read.
    """

    config_class = MixtralConfig

    def make_mixer(self, cfg: MixtralConfig, layer_idx: int) -> nn.Module:
        return Attention(cfg, layer_idx)

    def make_ffn(self, cfg: MixtralConfig, layer_idx: int) -> nn.Module:
        return SparseMoE(cfg, layer_idx)

    def make_rotary(self, cfg: MixtralConfig) -> nn.Module:
        return RotaryEmbedding(cfg)

    def _init_weights(self, m: nn.Module):
        super()._init_weights(m)  # the router is an nn.Linear: N(0, initializer_range)
        if isinstance(m, MixtralExperts):
            std = self.config.initializer_range
            nn.init.normal_(m.gate_up_proj, std=std)
            # GPT-2's scaled init for the residual branch's output, as Llama3 gives its down_proj.
            nn.init.normal_(m.down_proj, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def hidden_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        h = super().hidden_states(input_ids, cache)  # (B, T, D)
        self.check_routers()
        return h

    def forward(self, input_ids: torch.Tensor, cache=None, output_router_logits: bool = False, *,
                hidden_only: bool = False):
        logits = super().forward(input_ids, cache, hidden_only=hidden_only)  # (B, T, V), or (B, T, D)
        if not output_router_logits:
            return logits
        return logits, tuple(layer.mlp.router_logits for layer in self.model.layers)

    def check_routers(self) -> None:
        """NaN router logits make top-k pick arbitrary experts and poison every later layer, without
        any error; name the first layer where they appeared. One host read per forward, for all
        layers; skipped while training on a GPU (the loop reports a non-finite loss there) and
        under CUDA-graph capture or torch.compile, where a read is an error or a graph break."""
        first = self.model.layers[0].mlp.router_logits
        capturing = first.is_cuda and torch.cuda.is_current_stream_capturing()
        if (self.training and first.is_cuda) or capturing or torch.compiler.is_compiling():
            return
        finite = torch.stack([torch.isfinite(layer.mlp.router_logits).all() for layer in self.model.layers])  # (L,)
        if not bool(finite.all()):
            raise self.model.layers[int((~finite).nonzero()[0])].mlp.nonfinite_logits_error()

    def active_parameters(self) -> int:
        """Parameters one token uses: all but the (E - k) experts it is not routed to, per layer."""
        cfg = self.config
        idle = cfg.num_local_experts - cfg.num_experts_per_tok
        per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
        return self.num_parameters() - cfg.num_hidden_layers * idle * per_expert

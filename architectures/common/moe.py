"""The routed experts every mixture-of-experts family of the zoo shares: E feed-forwards stored as
stacked tensors, and the dispatch that runs each token through the k experts its router chose.

A router (each family's own: Mixtral's softmax top-k, DeepSeek-V3's sigmoid with a balancing bias,
which Nemotron-H reuses) hands over, per token, k expert ids and k weights; `StackedExperts` computes

    out(x) = sum_j w_j FFN_{idx_j}(x)

where every expert is either a SwiGLU, W_down (silu(W_gate x) * W_up x) (Mixtral, DeepSeek-V3), or
a non-gated FFN, W_down act(W_up x) (Nemotron-H's squared ReLU). The dispatch:

1. Sort the M = N*k (token, expert) pairs by expert and gather the token rows in that order:
   each expert's tokens become one contiguous slice.
2. Run each expert once on its slice: on a GPU in bf16 all E slices in ONE grouped GEMM launch per
   projection (`grouped_gemm`), elsewhere one matmul chain per expert.
3. Un-sort with a gather (`permute_rows`) and take each token's weighted sum of its k rows as one
   batched product: a fixed summation order, so training is reproducible on a GPU, where
   index_add_'s atomic adds are not.

Parameter names are transformers' (`gate_up_proj`, or `up_proj` for non-gated experts, and
`down_proj`), so checkpoints load by name; the families' pretrained.py convert the hub's
per-expert layout. notes/mixtral.md measures the dispatch against the alternatives.

Symbols: N tokens in the call, D the experts' input width, F one expert's width, E experts,
k experts per token, M = N*k (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from architectures.common.kernels import silu_and_mul, silu_and_mul_reference


def can_use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
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


class StackedExperts(nn.Module):
    """E feed-forward experts stored as stacked tensors, so they can run as one grouped GEMM.

    activation None: SwiGLU experts, gate_up_proj[e] = [W_gate; W_up] (2F, D), so one GEMM computes
    both halves (Mixtral's hub names them w1; w3). Otherwise non-gated experts with that activation,
    up_proj[e] = W_up (F, D). Either way down_proj[e] = W_down (D, F).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        E, D, Fd = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.gated = activation is None
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fd, D))
        else:
            self.up_proj = nn.Parameter(torch.empty(E, Fd, D))
            self.act = activation
        self.down_proj = nn.Parameter(torch.empty(E, D, Fd))

    @property
    def in_proj(self) -> nn.Parameter:
        """The first projection of every expert, (E, 2F or F, D), whichever its name."""
        return self.gate_up_proj if self.gated else self.up_proj

    def init_weights(self, std: float, down_std: float) -> None:
        """N(0, std) for the first projection, N(0, down_std) for the second (the families choose
        whether the residual branch's output gets GPT-2's scaled std)."""
        nn.init.normal_(self.in_proj, std=std)
        nn.init.normal_(self.down_proj, std=down_std)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """FFN_e(x), the plain formula: x (n, D) -> (n, D)."""
        h = F.linear(x, self.in_proj[e])  # (n, 2F) = [gate ; up], or (n, F)
        h = silu_and_mul_reference(h) if self.gated else self.act(h)  # (n, F)
        return F.linear(h, self.down_proj[e])

    def forward(self, x: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch: x (N, D), top_w / top_idx (N, k) -> sum_j top_w[:, j] * expert_{top_idx[:, j]}(x)."""
        N, k = top_idx.shape
        out_dtype = x.dtype
        # 1. Sort the M = N*k (token, expert) pairs by expert: each expert's tokens become one slice.
        experts_sorted, order = top_idx.reshape(-1).sort(stable=True)  # (M,), (M,)
        token = order // k  # (M,) the token each sorted pair came from
        grouped = can_use_grouped_mm(x, self.in_proj)
        if grouped and torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))  # cast before the gather: half the bytes to copy
        xs = x[token]  # (M, D) gathered: expert 0's tokens, then expert 1's, ...
        # 2. Each expert runs once, on its slice.
        if grouped:
            # GPU: the slice boundaries stay on the device, and a grouped GEMM does all experts at once.
            ends = torch.searchsorted(experts_sorted, torch.arange(self.num_experts, device=x.device), right=True)
            h = grouped_gemm(xs, self.in_proj, ends)  # (M, 2F) or (M, F)
            h = silu_and_mul(h) if self.gated else self.act(h)  # (M, F): silu(gate) * up in one pass
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

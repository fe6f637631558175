"""The Mamba-2 layer: projections, a causal convolution, the selective SSM (SSD) and a gated norm.

Paper: "Transformers are SSMs" (Dao & Gu, 2024, arXiv:2405.21060), section 7 (the Mamba-2
block). Reference implementation it is tested against: transformers' `Mamba2Mixer` and
`NemotronHMamba2Mixer` (tests/architectures/test_conformance.py and
tests/architectures/mamba2_hybrid/); names are theirs, so checkpoints load by name.

    [z, xBC, dt] = in_proj(u)                      z (H*P), xBC (H*P + 2*G*N), dt (H)
    xBC = silu(conv1d(xBC))                        depthwise, causal, width K
    [x, B, C] = xBC                                x (H, P), B and C (G, N)
    dt = clamp(softplus(dt + dt_bias), limit)      the step size of each head, per token
    A = -exp(A_log)                                one negative scalar per head
    y = SSD(x, dt, A, B, C) + D * x                ssd.py
    out = out_proj(RMSNorm(y * silu(z)))           normalised per group of H*P/G channels, or over all

Decoding keeps two tensors per sequence, whatever its length (the `StateSpec` of `cache_spec`):
    conv (conv_dim, K): the last K inputs of the convolution;
    ssm (H, P, N): the SSM state h.
With a cache, the layer asks it for those (`cache.state(layer)`, updated in place) and for the
layout of the step's tokens (`cache.read(layer)`: `pack` puts each sequence's new tokens in a row
of its own, `mask` says which are real). A row may be padded: on the left by the naive cache's
static batch, on the right by the paged engine's packing. Padding must not touch the state, so
it is zeroed before the convolution, and its x, B and dt after: with dt = 0 a step decays by
exp(0) = 1 and adds nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from architectures.common.cache import StateSpec
from architectures.mamba2_hybrid.config import Mamba2HybridConfig
from architectures.mamba2_hybrid.ssd import conv_step, ssd_chunked, ssd_step


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * g, the norm taken over groups of `group_size` channels (fp32 inside)."""

    def __init__(self, width: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        g = y.float() * F.silu(z.float())  # (..., H*P)
        g = g.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


def real_tokens(mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Which of the step's T tokens of each row are real (not padding), from a cache view's mask.

    The mask (rows, T, S), True = visible, gives what each query may see, the step's own tokens
    being its last T slots. The row's last query is a real token of the row (padding is on the
    left) or sees exactly the real ones (the paged engine's state view): its row of the mask,
    restricted to the step's slots, is the answer. None (no mask) or a (T, S) mask shared by every
    row: no padding. Returns (rows, T) bool, or None when every token is real."""
    if mask is None or mask.dim() == 2:
        return None
    visible = mask[:, -1, -T:]  # (rows, T)
    visible = visible if visible.dtype == torch.bool else visible == 0  # additive masks: 0 = visible
    return None if bool(visible.all()) else visible


class Mamba2Mixer(nn.Module):
    """The token mixer of an "M" layer: (B, T, D) -> (B, T, D), called as mixer(x, rope, cache)."""

    def __init__(self, cfg: Mamba2HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.P, self.N, self.G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
        self.K, self.chunk_size = cfg.conv_kernel, cfg.chunk_size
        self.d_inner, self.conv_dim = cfg.d_inner, cfg.conv_dim
        self.dt_limit = tuple(cfg.time_step_limit)
        self.in_proj = nn.Linear(cfg.hidden_size, self.d_inner + self.conv_dim + self.H, bias=cfg.use_bias)
        # Depthwise (groups = channels): each of x, B, C's channels is smoothed over its last K tokens.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.K, groups=self.conv_dim, padding=self.K - 1,
                                bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        group = self.d_inner // self.G if cfg.gated_norm_per_group else self.d_inner
        self.norm = GatedRMSNorm(self.d_inner, group, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.use_bias)
        self.reset_ssm_parameters(cfg)

    @torch.no_grad()
    def reset_ssm_parameters(self, cfg: Mamba2HybridConfig) -> None:
        """transformers' initialisation: A = 1 .. H (decays at every rate), D = 1, and dt_bias such that
        softplus(dt_bias) is log-uniform in [time_step_min, time_step_max]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.H) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                       + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus

    def cache_spec(self) -> StateSpec:
        return StateSpec((("conv", (self.conv_dim, self.K)), ("ssm", (self.H, self.P, self.N))))

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """Raw dt (..., H) -> the step size: softplus(dt + dt_bias), clamped to time_step_limit (fp32)."""
        lo, hi = self.dt_limit
        return F.softplus(dt.float() + self.dt_bias.float()).clamp(min=lo, max=hi)

    def _split(self, xBC: torch.Tensor):
        """(B, T, conv_dim) -> x (B, T, H, P), B and C (B, T, G, N)."""
        x, B, C = xBC.split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        return x.unflatten(-1, (self.H, self.P)), B.unflatten(-1, (self.G, self.N)), C.unflatten(-1, (self.G, self.N))

    def forward(self, u: torch.Tensor, rope=None, cache=None) -> torch.Tensor:
        A = -torch.exp(self.A_log.float())  # (H,)
        if cache is None:
            return self._output(*self._full(u, A))
        view = cache.read(self.layer_idx)  # no per-token tensors for this layer: only the layout
        state = cache.state(self.layer_idx)  # {"conv": (rows, conv_dim, K), "ssm": (rows, H, P, N)}
        u_rows = view.pack(u)  # (rows, T, D): one row per sequence
        T = u_rows.shape[1]
        real = real_tokens(view.mask, T)
        if T == 1 and real is None:
            y, z = self._decode(u_rows, A, state)
        else:
            y, z = self._prefill(u_rows, A, state, real)
        return view.unpack(self._output(y, z))

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # y: (B, T, H, P) fp32, with the D skip; z: (B, T, H*P)
        return self.out_proj(self.norm(y.flatten(-2).to(z.dtype), z))

    def _full(self, u, A):
        """No cache: the whole sequence at once, from zero state."""
        T = u.shape[1]
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.H], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))  # (B, T, conv_dim)
        x, B, C = self._split(xBC)
        y, _ = ssd_chunked(x, self._dt(dt), A, B, C, self.chunk_size)
        return y + self.D.float()[:, None] * x.float(), z

    def _prefill(self, u, A, state, real):
        """Several tokens per row, continuing from the rows' states (zero for a new sequence)."""
        T = u.shape[1]
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.H], dim=-1)
        if real is not None:
            xBC = xBC * real[..., None]  # padding enters the convolution as the zeros before a sequence
        # Convolve [window; new tokens]: token t's window is the K inputs ending at it.
        full = torch.cat([state["conv"], xBC.transpose(1, 2).to(state["conv"].dtype)], dim=-1)  # (rows, ch, K + T)
        conv = F.conv1d(full, self.conv1d.weight.to(full.dtype), None if self.conv1d.bias is None
                        else self.conv1d.bias.to(full.dtype), groups=self.conv_dim)[..., 1:]  # (rows, ch, T)
        # The new window: the K inputs ending at each row's last real token.
        if real is None:
            state["conv"].copy_(full[..., -self.K:])
        else:
            last = torch.where(real, torch.arange(T, device=u.device), -1).max(dim=1).values  # (rows,)
            cols = last[:, None] + 1 + torch.arange(self.K, device=u.device)  # (rows, K)
            state["conv"].copy_(full.gather(2, cols[:, None, :].expand(-1, self.conv_dim, -1)))
        x, B, C = self._split(F.silu(conv.transpose(1, 2)).to(u.dtype))
        dt = self._dt(dt)  # (rows, T, H)
        if real is not None:  # padding: no input, no decay
            x, B, dt = x * real[..., None, None], B * real[..., None, None], dt * real[..., None]
        y, final = ssd_chunked(x, dt, A, B, C, self.chunk_size, initial_state=state["ssm"])
        state["ssm"].copy_(final)
        return y + self.D.float()[:, None] * x.float(), z

    def _decode(self, u, A, state):
        """One token per row: the convolution and the SSM each take one step from their state."""
        z, xBC, dt = self.in_proj(u[:, 0]).split([self.d_inner, self.conv_dim, self.H], dim=-1)  # (rows, ...)
        out, window = conv_step(state["conv"], xBC, self.conv1d.weight[:, 0], self.conv1d.bias)
        state["conv"].copy_(window)
        x, B, C = self._split(F.silu(out).to(u.dtype)[:, None])
        y, new = ssd_step(x[:, 0], self._dt(dt), A, B[:, 0], C[:, 0], state["ssm"])  # (rows, H, P)
        state["ssm"].copy_(new)
        y = y + self.D.float()[:, None] * x[:, 0].float()
        return y[:, None], z[:, None]

"""SSD, the state-space layer of Mamba-2, three ways that compute one function.

Paper: "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality" (Dao & Gu, 2024, arXiv:2405.21060), sections 6-7 and its `ssd_minimal`
listing. Tested against each other (values and gradients, float64) in
tests/architectures/mamba2_hybrid/test_ssd.py, and through the model against transformers'
`Mamba2ForCausalLM` and `NemotronHForCausalLM`.

Per head, with a scalar decay a_t = exp(dt_t A) (A < 0, so 0 < a_t <= 1):

    h_t = a_t h_{t-1} + dt_t x_t B_t^T      state h_t: (P, N)
    y_t = h_t C_t                           output y_t: (P,)

1. `ssd_sequential`: that recurrence, one token at a time. Slow and obviously right.
2. `ssd_chunked`: the same map as matrix products. Unrolled, y = M x with the semiseparable matrix
   M[t, s] = C_t . B_s * dt_s * a_{s+1} ... a_t for s <= t (0 above the diagonal): attention with
   a decaying causal mask. Cut the sequence into chunks of Q tokens; the blocks of M on the
   diagonal are small dense matrices (quadratic in Q, done as matmuls), and every block below is
   of rank N, so it factors through the state at the chunk boundary: per-chunk states, a short
   recurrence over chunks, then state -> output. Linear in T, and nearly all of it matmuls.
3. `ssd_step`: one token from the state, for decoding: O(1) work and memory per token.
`conv_step` is the decoding step of the causal convolution that precedes the SSM.

Symbols (the paper's): b batch, l tokens (T), h heads (H), p head dim (P), n state size (N),
g groups sharing B and C (G), Q chunk size, c chunks. Shapes:
    x (b, l, h, p)   dt (b, l, h), after softplus and clamp   A (h,)   B, C (b, l, g, n)
    state (b, h, p, n)   ->   y (b, l, h, p)
The D skip (y += D x) and the gated norm are the mixer's (mixer.py), not part of the SSM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, h, n): head i reads group i // (h / g), as GQA's query heads share a KV head."""
    return t.repeat_interleave(h // t.shape[2], dim=2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # The cumulative sums of log-decays lose precision in half types: compute in fp32 (or fp64 in tests).
    return torch.promote_types(x.dtype, torch.float32)


def ssd_sequential(x, dt, A, B, C, initial_state=None):
    """The recurrence, token by token -> (y (b, l, h, p), final state (b, h, p, n))."""
    b, l, h, p = x.shape
    dtype = _compute_dtype(x)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B, C = _heads(B, h).to(dtype), _heads(C, h).to(dtype)  # (b, l, h, n)
    state = (torch.zeros(b, h, p, B.shape[-1], dtype=dtype, device=x.device) if initial_state is None
             else initial_state.to(dtype))
    ys = []
    for t in range(l):
        a = torch.exp(dt[:, t] * A)  # (b, h) decay of this step
        # h_t = a_t h_{t-1} + dt_t x_t B_t^T: (b, h, p, n)
        state = a[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))  # y_t = h_t C_t
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, state


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., Q) log-decays -> (..., Q, Q): S[i, j] = a_{j+1} + ... + a_i for j <= i, -inf above the diagonal,
    so exp(S)[i, j] = the product of the decays between token j and token i (1 on the diagonal).

    Sums of the masked values rather than differences of one cumulative sum, which would cancel
    badly for long chunks (the paper's "stable" segsum)."""
    Q = a.shape[-1]
    a = a[..., :, None].expand(*a.shape, Q)  # [..., i, j] = a_i
    strictly_below = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)
    S = torch.cumsum(a.masked_fill(~strictly_below, 0.0), dim=-2)  # sum of a_k over j < k <= i
    below = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device))
    return S.masked_fill(~below, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, matmul_dtype: torch.dtype | None = None):
    """The chunked SSD algorithm (Listing 1 of the paper) -> (y (b, l, h, p), final state (b, h, p, n)).

    T need not be a multiple of Q: the tail is padded with dt = 0 (decay 1, no input), which
    leaves the outputs of real tokens and the final state unchanged.
    matmul_dtype: None, every product in the compute dtype (fp32, or fp64 in tests); torch.bfloat16, the
    operands of the four big products in bf16 (summed in fp32 inside the matmul, rounded to bf16 after)
    while the log-decays, their sums and exponentials stay fp32: the precision split of the mamba_ssm
    Triton kernel, and tensor-core speed on a GPU. y then carries bf16's rounding (about 4e-3 relative)."""
    b, l, h, p = x.shape
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(x)
    mm = matmul_dtype or dtype  # the operands' type in the four big products
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B, C = _heads(B, h).to(dtype), _heads(C, h).to(dtype)  # (b, l, h, n)
    n, Q = B.shape[-1], chunk_size
    pad = (-l) % Q
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    dt = F.pad(dt, (0, 0, 0, pad))
    x, B, C = (rearrange(t, "b (c q) h n -> b c q h n", q=Q) for t in (x, B, C))  # (b, c, Q, h, p or n)
    dt = rearrange(dt, "b (c q) h -> b c q h", q=Q)  # (b, c, Q, h)
    a = rearrange(dt * A, "b c q h -> b h c q")  # (b, h, c, Q): log-decays log a_t = dt_t A
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, Q): log of the decay from the chunk's start to token t
    xdt = (x * dt[..., None]).to(mm)  # (b, c, Q, h, p): dt_s x_s, the input of step s

    # 1. Diagonal blocks: within a chunk, y_t = sum_{s <= t} (C_t . B_s) L[t, s] dt_s x_s ("attention").
    L = torch.exp(segsum(a))  # (b, h, c, Q, Q)
    scores = torch.einsum("bcthn,bcshn->bhcts", C.to(mm), B.to(mm)).to(dtype) * L  # (b, h, c, Q, Q): M's diagonal blocks
    y_diag = torch.einsum("bhcts,bcshp->bcthp", scores.to(mm), xdt)

    # 2. The state each chunk leaves, starting from zero: sum_s (decay from s to the chunk's end) dt_s x_s B_s^T.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, Q)
    B_decayed = B * rearrange(decay_to_end, "b h c q -> b c q h 1")  # (b, c, Q, h, n)
    states = torch.einsum("bcshn,bcshp->bchpn", B_decayed.to(mm), xdt).to(dtype)  # (b, c, h, p, n)

    # 3. Inter-chunk recurrence: H_c = (decay over chunk c) H_{c-1} + states_c, from the initial state.
    #    Written as one product with the (c+1) x (c+1) segsum matrix of the chunks' total decays.
    h0 = (torch.zeros(b, h, p, n, dtype=dtype, device=x.device) if initial_state is None
          else initial_state.to(dtype))
    states = torch.cat([h0[:, None], states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # state at the end of chunk z - 1
    entering, final = states[:, :-1], states[:, -1]  # (b, c, h, p, n) the state entering each chunk; (b, h, p, n)

    # 4. State -> output: the state entering the chunk, read by C_t, decayed to token t.
    decay_from_start = rearrange(torch.exp(a_cum), "b h c q -> b c q h 1")  # (b, c, Q, h, 1)
    y_off = torch.einsum("bcthn,bchpn->bcthp", C.to(mm), entering.to(mm)).to(dtype) * decay_from_start

    y = rearrange(y_diag.to(dtype) + y_off, "b c q h p -> b (c q) h p")[:, :l]  # (b, l, h, p), padding cut
    return y, final


def ssd_step(x, dt, A, B, C, state):
    """One decoding step from the state -> (y (b, h, p), new state (b, h, p, n)).

    x (b, h, p), dt (b, h), B and C (b, g, n), state (b, h, p, n): the recurrence for one token.
    Returns a new state (the caller copies it into its cache), so gradients flow as in the others."""
    h = x.shape[1]
    dtype = _compute_dtype(x)
    B, C = _heads(B[:, None], h)[:, 0].to(dtype), _heads(C[:, None], h)[:, 0].to(dtype)  # (b, h, n)
    dt = dt.to(dtype)
    a = torch.exp(dt * A.to(dtype))  # (b, h)
    new = a[..., None, None] * state.to(dtype) + (dt[..., None] * x.to(dtype))[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", new, C), new


def conv_step(window: torch.Tensor, new: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The depthwise causal convolution for one token -> (output (b, ch), new window (b, ch, K)).

    window (b, ch, K): the last K inputs (the oldest first); new (b, ch); weight (ch, K). The new
    token's output is sum_k weight[:, k] * input_{t - K + 1 + k}: the window shifted by one."""
    window = torch.cat([window[..., 1:], new[..., None].to(window.dtype)], dim=-1)  # (b, ch, K)
    out = (window * weight.to(window.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(window.dtype)
    return out, window

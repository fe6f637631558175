"""PPO's arithmetic for language models: rewards per token, GAE, whitening, the two clipped losses.

Papers and the implementations they are checked by:
- PPO, "Proximal Policy Optimization Algorithms" (Schulman et al., 2017, arXiv:1707.06347): the
  clipped surrogate (its eq. 7) and GAE as it uses it;
- GAE, "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (Schulman et
  al., 2015, arXiv:1506.02438), eq. 16;
- RLHF with PPO on language models: "Learning to summarize from human feedback" (Stiennon et al.,
  2020, arXiv:2009.01325) and InstructGPT (Ouyang et al., 2022, arXiv:2203.02155): the reward
  model's score at the last token, a per-token KL penalty to the reference folded into the rewards;
- "The N+ Implementation Details of RLHF with PPO" (Huang et al., 2024, arXiv:2403.17031): the
  details as the well-documented implementations (OpenAI's lm-human-preferences, TRL's PPO
  trainer) have them: advantage whitening, the clipped value loss with its 0.5, k1 for the KL,
  gamma 1 and lambda 0.95.

Symbols (notes/ppo.md): an episode is one sampled reply, its tokens t = 0 .. T-1 the actions.
    r_t     = -beta (log pi_old(a_t) - log pi_ref(a_t)) + [t = T-1] score       (`kl_penalised_rewards`)
    delta_t = r_t + gamma V_{t+1} - V_t,  V_T = 0 (the episode ends: no bootstrap)
    A_t     = delta_t + gamma lambda A_{t+1},  A_T = 0;   returns R_t = A_t + V_t   (`gae`)
    policy  = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))          (`ppo_policy_loss`)
    value   = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)  (`ppo_value_loss`)
Every (B, T) tensor here takes a bool `mask`, True on the episode's tokens; the means are over
the masked tokens of the whole batch (as TRL's `masked_mean`). Tested against slow loops written
out one episode and one token at a time in tests/training/ppo/test_ppo_loss.py.
"""

from __future__ import annotations

import torch


def check_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1] (1: no discount; GAE's lambda trades bias for variance), "
                         f"got {value}")


def _check_shapes(mask: torch.Tensor | None, **tensors: torch.Tensor) -> torch.Tensor:
    """The (B, T) mask (all True if None), after checking every tensor is (B, T) and the mask bool."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(tensors.values()))
    if first.dim() != 2 or len(set(shapes.values())) != 1:
        raise ValueError("expected (B, T) tensors of one shape, one entry per token; got "
                         + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    if mask is None:
        return torch.ones_like(first, dtype=torch.bool)
    if mask.dtype != torch.bool or mask.shape != first.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(first.shape)}, True on the episode's tokens; "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch (var unbiased, as
    TRL's masked_whiten); 0 outside the mask. With shift_mean=False the mean is added back:
    the scale changes, the sign of each entry relative to 0 does not."""
    m = mask.to(x.dtype)
    n = m.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 masked entries to estimate a variance, got {int(n)}")
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B, T), kl (B, T)): every token is rewarded -kl_coef (log pi_old - log pi_ref) (the k1
    estimate of the KL, whose sum over a reply estimates the sequence KL), and the last masked token
    of each row also gets the row's score (B,). Outside the mask both are 0."""
    mask = _check_shapes(mask, logps=logps, ref_logps=ref_logps)
    if not (isinstance(kl_coef, (int, float)) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be >= 0 (0: no KL penalty in the reward), got {kl_coef}")
    if scores.shape != logps.shape[:1]:
        raise ValueError(f"scores must be one number per row, shape ({logps.shape[0]},), got {tuple(scores.shape)}")
    if not mask.any(dim=1).all():
        raise ValueError("every row needs at least one masked token: an empty reply has no last token to score")
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    t = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, t, -1).max(dim=1).values  # (B,): the index of each row's last token
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float, *,
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T): generalised advantage estimation over episodes that end at
    their last token with no bootstrap (the value after the last token is 0).

    rewards, values (B, T); `mask` (B, T) bool, True on the episode's tokens, taken in order (the
    tokens outside it, prompt or padding, are skipped, and get advantage and return 0)."""
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    mask = _check_shapes(mask, rewards=rewards, values=values)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # V of the next episode token: 0 after the last
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_advantage
        on = mask[:, t]
        advantages[:, t] = torch.where(on, a, 0.0)
        next_value = torch.where(on, values[:, t], next_value)  # a skipped position passes the next one's on
        next_advantage = torch.where(on, a, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics): the clipped surrogate, mean over the batch's masked tokens, with a per-token
    advantage (B, T). metrics: "policy_clipfrac" (the fraction of tokens whose clipped term was
    the larger, so the clip took their gradient away) and "approx_kl" (0.5 mean (log rho)^2, how
    far the policy has moved from the one that sampled)."""
    mask = _check_shapes(mask, logps=logps, old_logps=old_logps, advantages=advantages)
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 (the ratio is kept within [1 - clip_eps, 1 + clip_eps]), got {clip_eps}")
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"policy_clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_value: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics): 0.5 x the larger of the plain and the clipped squared error, mean over the
    masked tokens; the clipped prediction stays within clip_value of the rollout's value. metrics:
    "value_clipfrac" (the fraction of tokens where the clipped error was the larger)."""
    mask = _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0 (a value prediction moves at most that far per rollout), "
                         f"got {clip_value}")
    clipped = torch.clamp(values, old_values - clip_value, old_values + clip_value)
    plain_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"value_clipfrac": masked_mean((clipped_error > plain_error).float(), mask)}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 when the value model
    predicts the returns, 0 when it does no better than their mean, negative when worse."""
    mask = _check_shapes(mask, values=values, returns=returns)
    r, v = returns[mask].double(), values[mask].double()
    var = r.var(unbiased=False)
    return (1 - (r - v).var(unbiased=False) / var).float() if var > 0 else torch.tensor(float("nan"))


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions softmax(logits) (B, T, V) over the masked positions."""
    logp = torch.log_softmax(logits.float(), -1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)

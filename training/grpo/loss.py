"""GRPO's objective: a clipped policy gradient with a group baseline instead of a critic.

Papers:
- GRPO, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
  (Shao et al., 2024, arXiv:2402.03300), eqs. 3-4: G completions of each prompt, advantages
  normalised within the group, the PPO-clipped ratio, and a KL penalty with the k3 estimator;
- PPO's clipped surrogate, "Proximal Policy Optimization Algorithms" (Schulman et al., 2017,
  arXiv:1707.06347);
- the k3 estimator, "Approximating KL Divergence" (Schulman, 2020, joschu.net/blog/kl-approx.html);
- token-level averaging, DAPO, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
  (Yu et al., 2025, arXiv:2503.14476), section 3.3.

Symbols (notes/grpo.md): for completion i of a group and its token t,
    rho_it = pi_theta(o_it | ...) / pi_old(o_it | ...)                the policy ratio
    A_i    = (r_i - mean(r_group)) / (std(r_group) + eps)             the group-normalised advantage
    k3_it  = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1   >= 0, = 0 iff equal
    loss   = sum_it mask_it [ -min(rho_it A_i, clip(rho_it, 1 - clip_eps, 1 + clip_eps) A_i) + kl_coef k3_it ]
             / sum_it mask_it

The division is by the tokens of the whole batch (DAPO), not per-sequence means averaged over
sequences (GRPO's paper): a long completion's tokens weigh as much as a short one's, so long
wrong answers are not diluted. This file is only the objective; sampling the groups and scoring
them is the train script's. Tested in tests/training/grpo/test_grpo_loss.py.
"""

from __future__ import annotations

import torch


def check_rewards(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """The rewards of n completions as a float tensor (n,), or a clear error: a reward function
    that returned the wrong number of scores, or a NaN / infinite score, would otherwise turn
    into NaN advantages and silently poison every parameter at the next step."""
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.shape != (n,):
        raise ValueError(f"expected one reward per completion, shape ({n},), got shape {tuple(rewards.shape)}; "
                         f"a reward function must score every completion it is given, once")
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards must be finite numbers; completions {bad[:10]} got "
                         f"{[float(rewards[i]) for i in bad[:10]]}; make the reward function return a number "
                         f"(e.g. 0.0 for an unparsable answer) for every completion")
    return rewards


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), (N,) -> (N,).

    rewards (N,) hold N / group_size groups of consecutive completions (completion j of prompt i
    at i * group_size + j). The group mean is the baseline a critic would otherwise learn; the std
    (unbiased, as TRL computes it; the GRPO paper writes std() without naming an estimator) puts
    every prompt's advantages on one scale. A group
    whose completions all scored the same has advantages 0: it teaches nothing."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2: the baseline of a completion is the mean reward of the other "
                         f"completions of its prompt, and a group of {group_size} has none to compare with")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor, one reward per completion, got {shape}")
    rewards = check_rewards(rewards, rewards.numel())
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not divide into groups of {group_size}")
    groups = rewards.view(-1, group_size)  # (prompts, G)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)  # (N,)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_theta || pi_ref) per sampled token: exp(d) - d - 1 with
    d = log pi_ref - log pi_theta. Unbiased for tokens sampled from pi_theta (E[exp(d)] = 1), and
    >= 0 for every token (exp(d) >= 1 + d), unlike the plain -d."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.04,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics): the GRPO objective averaged over every completion token of the batch.

    logps (B, T): log pi_theta of each sampled completion token (with gradient); old_logps (B, T):
    the same under the policy that sampled them (equal to logps, detached, on the first update of
    a batch); ref_logps (B, T): under the frozen reference; advantages (B,); mask (B, T) bool, True
    on completion tokens. To weigh every token of a whole optimizer step equally across
    micro-batches, a train script multiplies the loss by mask.sum() and reports that count as the
    loop's num_tokens (training/trainer.py).
    metrics: "kl" (mean k3), "clip_ratio" (fraction of tokens whose gradient the clip removed),
    "ratio" (mean rho), all detached."""
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 (the ratio is kept within [1 - clip_eps, 1 + clip_eps]), "
                         f"got {clip_eps}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0 (0: no KL penalty to the reference), got {kl_coef}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, True on completion tokens; got {mask.dtype} (pass mask.bool())")
    shapes = {"logps": logps.shape, "old_logps": old_logps.shape, "ref_logps": ref_logps.shape, "mask": mask.shape}
    if logps.dim() != 2 or len(set(shapes.values())) != 1 or advantages.shape != logps.shape[:1]:
        raise ValueError("logps, old_logps, ref_logps and mask must all be (B, T) and advantages (B,); got "
                         + ", ".join(f"{k} {tuple(v)}" for k, v in {**shapes, "advantages": advantages.shape}.items()))

    ratio = torch.exp(logps - old_logps)  # rho, (B, T)
    a = advantages[:, None].to(ratio.dtype)  # (B, 1): one advantage for every token of a completion
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
    # The pessimistic bound: once rho has moved clip_eps in the direction the advantage favours,
    # the clipped term is the smaller, it is constant in theta, and the token stops pulling.
    policy_term = -torch.minimum(unclipped, clipped)  # (B, T)
    kl = k3(logps, ref_logps)  # (B, T)
    per_token = policy_term + kl_coef * kl
    m = mask.to(per_token.dtype)
    n_tokens = m.sum().clamp_min(1)
    loss = (per_token * m).sum() / n_tokens  # every token of the batch weighs the same (DAPO)
    with torch.no_grad():
        was_clipped = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
        metrics = {"kl": (kl * m).sum() / n_tokens, "clip_ratio": (was_clipped * m).sum() / n_tokens,
                   "ratio": (ratio * m).sum() / n_tokens}
    return loss, metrics

"""PPO's batches: one rollout of replies scored by a reward model, cut into minibatches for several epochs.

One rollout (`PPORollouts.rollout`): draw N prompts, sample one reply to each with the paged
engine (`sample_completions`, shared with GRPO), then, with no gradient, for every reply token:
- its log-probability under the policy that sampled it (old_logps) and under the frozen
  reference (ref_logps), at the sampling temperature (`token_logps`);
- the value model's estimate V_t of the return from that position (old_values);
- the reward model's score of the whole reply, read at its last token, minus
  `missing_eos_penalty` for a reply cut off by max_new_tokens before its end-of-turn (Huang et al.
  2024, detail 23: a truncated reply is not a reply);
- per-token rewards: the KL penalty on every token and the score on the last
  (`kl_penalised_rewards`), GAE advantages and returns (`gae`), the advantages whitened over the
  rollout (`whiten`).
Then the loop takes `epochs` x `minibatches` optimizer steps on it: each epoch visits the
rollout's replies once, in a new random order, `minibatches` slices of the loop's batch size.
The first `value_warmup_steps` minibatches carry policy_weight 0: the value model alone learns
from them while the policy stays the SFT model (the value model starts as the reward model, whose
head means nothing before a reply's end), so the policy's first updates get advantages from a
value model that has seen its returns.

With score_baseline "greedy", the reward model's score of the policy's own greedy reply to the same
prompt is subtracted from each sampled reply's score (ReMax's baseline: Li et al. 2023,
arXiv:2310.10505). The Bradley-Terry loss fits only score differences between replies to one prompt,
so a reward model may add any constant per prompt; measured in notes/ppo.md, that offset is most of
the score's variance across one-reply-per-prompt rollouts, and the value model would have to learn
it. The difference is what is left: did this sample beat the greedy answer? The constant does not
depend on the reply, so the policy gradient's expectation is unchanged.

The task's checker says which replies are right; it is logged ("accuracy") but PPO never sees it:
the reward model's score is the only reward.
"""

from __future__ import annotations

import torch
from torch import nn

from training.chat import ChatFormat
from training.grpo.rollout import completion_batch, reply_text, sample_completions, token_logps
from training.ppo.loss import explained_variance, gae, kl_penalised_rewards, whiten


BASELINES = ("none", "greedy")  # what is subtracted from each reply's score: nothing, or the greedy reply's


class PolicyAndValue(nn.Module):
    """The one module the loop trains: the policy and the value model, side by side (one optimizer
    over both, as TRL's PPO trainer wraps them)."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


def full_sequences(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids (N, W), last (N,), first (N,)): prompt + reply, right-padded, the index of each one's last
    token and of its reply's first."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
    return (ids.to(device), torch.tensor([len(p) + len(c) - 1 for p, c in rows], device=device),
            torch.tensor([len(p) for p, _ in rows], device=device))


class PPORollouts:
    """The loop's `sample_batch`. `model` is the `PolicyAndValue` being trained, `reference` the
    policy's `Reference`, `reward_model` a frozen `ScalarModel`, `checker(replies, answers)` the
    task's exact-answer check (logged only)."""

    def __init__(self, model: PolicyAndValue, reference, reward_model: nn.Module, fmt: ChatFormat, examples: dict,
                 checker, *, epochs: int, minibatches: int, temperature: float, max_new_tokens: int, kl_coef: float,
                 gamma: float, lam: float, missing_eos_penalty: float, whiten_advantages: bool = True,
                 value_warmup_steps: int = 0, score_baseline: str = "none"):
        if epochs < 1 or minibatches < 1:
            raise ValueError(f"epochs and minibatches must be >= 1, got {epochs} and {minibatches}")
        if value_warmup_steps < 0:
            raise ValueError(f"value_warmup_steps must be >= 0, got {value_warmup_steps}")
        self.model, self.reference, self.reward_model, self.fmt = model, reference, reward_model, fmt
        self.examples, self.checker = examples, checker
        self.epochs, self.minibatches = epochs, minibatches
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.kl_coef, self.gamma, self.lam = kl_coef, gamma, lam
        self.missing_eos_penalty, self.whiten_advantages = missing_eos_penalty, whiten_advantages
        if score_baseline not in BASELINES:
            raise ValueError(f"score_baseline must be one of {', '.join(BASELINES)}, got {score_baseline!r}")
        self.value_warmup_steps, self.score_baseline = value_warmup_steps, score_baseline
        self.calls, self.current, self.order = 0, None, None

    def __call__(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if split != "train":
            return self.rollout(split, n, generator)
        per_rollout = self.epochs * self.minibatches
        index = self.calls % per_rollout
        if self.current is None or index == 0:
            self.current = self.rollout(split, n * self.minibatches, generator)
        if index % self.minibatches == 0:  # a new epoch: a new order of the rollout's replies
            self.order = torch.randperm(n * self.minibatches, generator=generator)
        self.calls += 1
        rows = self.order[(index % self.minibatches) * n:(index % self.minibatches + 1) * n]
        batch = {k: v[rows.to(v.device)] for k, v in self.current.items()}
        warm = self.calls > self.value_warmup_steps  # this step trains the policy too
        batch["policy_weight"] = torch.full((n,), float(warm), device=next(iter(batch.values())).device)
        return batch

    def scores(self, rows: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
        """The reward model's score of each (prompt, reply), minus missing_eos_penalty for a reply cut
        off before its end-of-turn: (N,)."""
        full, last, first = full_sequences(rows, self.fmt.tokenizer.pad_id or 0, device)
        scores = self.reward_model.score(full, last, first)
        ended = torch.tensor([bool(c) and c[-1] in self.fmt.stop_ids for _, c in rows], device=device)
        return torch.where(ended, scores, scores - self.missing_eos_penalty)

    @torch.no_grad()
    def rollout(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pool = self.examples[split]
        picked = [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=generator)]
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        policy, value = self.model.policy, self.model.value
        was_training = self.model.training
        self.model.eval()
        device = next(policy.parameters()).device
        rows = sample_completions(policy, self.fmt, [e.prompt for e in picked], 1, self.temperature,
                                  self.max_new_tokens, seed)
        ids, targets = completion_batch(rows, device)
        mask = targets != -100
        old_logps = token_logps(policy, ids, targets, self.temperature)
        with self.reference.model(policy) as reference:
            ref_logps = token_logps(reference, ids, targets, self.temperature)
        old_values = value(ids) * mask
        scores = self.scores(rows, device)
        answers = [e.answer for e in picked]
        baseline = torch.zeros_like(scores)
        if self.score_baseline == "greedy":
            greedy = sample_completions(policy, self.fmt, [e.prompt for e in picked], 1, 0.0, self.max_new_tokens, seed)
            baseline = self.scores(greedy, device)
            greedy_correct = self.checker([reply_text(self.fmt, c) for _, c in greedy], answers).to(device)
        rewards, kl = kl_penalised_rewards(scores - baseline, old_logps, ref_logps, mask, self.kl_coef)
        advantages, returns = gae(rewards, old_values, self.gamma, self.lam, mask=mask)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask)
        self.model.train(was_training)
        replies = [reply_text(self.fmt, c) for _, c in rows]
        correct = self.checker(replies, answers).to(device)
        ev = explained_variance(old_values, returns, mask)
        extra = {"greedy_correct": greedy_correct} if self.score_baseline == "greedy" else {}
        return {**extra, "input_ids": ids, "targets": targets, "old_logps": old_logps, "old_values": old_values,
                "advantages": advantages, "returns": returns,
                "score": scores, "kl_sum": kl.sum(1), "return": rewards.sum(1), "correct": correct,
                "length": mask.sum(1).float(), "explained_variance": ev.expand(n).to(device)}

"""GRPO's batch: groups of completions sampled by the zoo's engine, scored by a verifiable reward.

One rollout: draw P prompts, sample G completions of each with `LLMEngine` (SamplingParams(n=G):
the prompt's K/V is computed once and shared by its G completions through the engine's prefix
blocks), score every completion with the reward function, normalise rewards within each group
(`group_advantages`), and record, for every completion token, its log-probability under the policy
that sampled it (old_logps) and under the frozen reference (ref_logps, from a
`training.posttrain.Reference`). The loop then takes
`updates_per_rollout` optimizer steps on the same rollout (the ratio pi / pi_old moves away from 1
after the first, which is what the clipping is for) before the next one is drawn.

The reward is verifiable: `arithmetic_reward` gives 1 for the exact answer, plus a small format
term for a reply that is a bare integer (the shape of an answer, right or wrong).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.chat import ChatFormat
from training.grpo.loss import check_rewards, group_advantages
from architectures.common.loss import IGNORE_INDEX

INTEGER = re.compile(r"-?\d+")


@dataclass
class RLDataConfig:
    """The data options of the RL methods that sample answers to the built-in arithmetic task (GRPO, PPO)."""
    train_prompts: int = 5000  # built-in arithmetic questions to sample prompts from
    eval_examples: int = 200  # held-out questions scored greedily before and after
    arithmetic_digits: int = 2  # as the SFT run's
    max_new_tokens: int = 6  # longest sampled answer


def arithmetic_reward(replies: list[str], answers: list[str], format_weight: float = 0.1) -> torch.Tensor:
    """1 for the exact answer, + format_weight for a reply that is a bare integer: (N,)."""
    return torch.tensor([float(r == a) + format_weight * bool(INTEGER.fullmatch(r)) for r, a in zip(replies, answers)])


def token_logps(model, ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[t] | ids[:t+1]) at every position, 0 where targets is -100: (N, T), fp32.

    p is the distribution the rollouts sample from, softmax(logits / temperature), as TRL's GRPO
    trainer computes it: at a temperature below 1 the ratio, the KL and the gradient are those of
    the sampling policy, so the samples are on-policy."""
    logits = model(ids).float() / temperature  # (N, T, V)
    safe = targets.clamp_min(0)
    logps = torch.gather(F.log_softmax(logits, -1), -1, safe[..., None])[..., 0]
    return logps * (targets != IGNORE_INDEX)


class Rollouts:
    """The loop's `sample_batch`: a new rollout every `updates_per_rollout` training steps.
    `reference` is the policy's `Reference` (training/posttrain.py): a frozen copy, or the policy
    with its LoRA adapters off."""

    def __init__(self, model, reference, fmt: ChatFormat, examples: dict, group_size: int,
                 updates_per_rollout: int, temperature: float, max_new_tokens: int, reward_fn=arithmetic_reward):
        group_advantages(torch.zeros(group_size), group_size)  # a group size < 2 fails here, before any sampling
        if updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout must be >= 1, got {updates_per_rollout}")
        self.model, self.reference, self.fmt = model, reference, fmt
        self.examples = examples  # split -> Examples
        self.G, self.mu = group_size, updates_per_rollout
        self.temperature, self.max_new_tokens, self.reward_fn = temperature, max_new_tokens, reward_fn
        self.calls, self.current = 0, None

    def __call__(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if n % self.G:
            raise ValueError(f"the batch of {n} completions does not divide into groups of {self.G}; "
                             f"make --batch-size a multiple of --group-size")
        if split != "train":
            return self.rollout(split, n, generator)
        if self.current is None or self.calls % self.mu == 0:
            self.current = self.rollout(split, n, generator)
        self.calls += 1
        return self.current

    @torch.no_grad()
    def rollout(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pool = self.examples[split]
        picked = [pool[int(i)] for i in torch.randint(len(pool), (n // self.G,), generator=generator)]
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        rows = sample_completions(self.model, self.fmt, [e.prompt for e in picked], self.G, self.temperature,
                                  self.max_new_tokens, seed)
        answers = [e.answer for e in picked for _ in range(self.G)]
        replies = [reply_text(self.fmt, c) for _, c in rows]
        lengths = [len(c) for _, c in rows]
        rewards = check_rewards(self.reward_fn(replies, answers), len(rows))
        ids, targets = completion_batch(rows, device)
        old = token_logps(self.model, ids, targets, self.temperature)
        with self.reference.model(self.model) as reference:
            ref = token_logps(reference, ids, targets, self.temperature)
        self.model.train(was_training)
        correct = torch.tensor([float(r == a) for r, a in zip(replies, answers)])
        return {"input_ids": ids, "targets": targets, "old_logps": old, "ref_logps": ref,
                "advantages": group_advantages(rewards, self.G).to(device), "reward": rewards.to(device),
                "correct": correct.to(device), "length": torch.tensor(lengths, dtype=torch.float32, device=device)}


def sample_completions(model, fmt: ChatFormat, prompts: list, n: int, temperature: float, max_new_tokens: int,
                       seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of n completions of each prompt (a list of messages), sampled by the
    paged engine, completion j of prompt i at i * n + j. A completion ends with its stop token, when
    it reached one within max_new_tokens. GRPO's and PPO's rollouts both sample here."""
    from inference.engine import EngineConfig, LLMEngine
    from inference.sampling import SamplingParams

    ids = [fmt.prompt(list(p)) for p in prompts]
    longest = max(map(len, ids)) + max_new_tokens
    engine = LLMEngine(model, EngineConfig(num_blocks=(len(ids) * n * (longest // 16 + 2)) + 8, max_model_len=longest))
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=fmt.stop_ids)
    outputs = engine.generate(ids, params)
    return [(p, list(c)) for p, out in zip(ids, outputs) for c in out.completions]


def reply_text(fmt: ChatFormat, completion: list[int]) -> str:
    """A completion as the reply a checker reads: decoded without its stop token, stripped."""
    return fmt.tokenizer.decode([t for t in completion if t not in fmt.stop_ids]).strip()


def completion_batch(rows: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), each (N, W): prompt + completion but its last token as inputs, and the
    completion's tokens as targets at the positions that predict them (-100 elsewhere)."""
    width = max(len(p) + len(c) for p, c in rows) - 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c)
        ids[i, :len(seq) - 1] = seq[:-1]
        targets[i, len(p) - 1:len(seq) - 1] = seq[len(p):]  # the completion's tokens, predicted from the position before
    return ids.to(device), targets.to(device)

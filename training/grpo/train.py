"""GRPO: reinforcement learning from a verifiable reward, with a group baseline instead of a critic.

    python -m training.grpo.train --preset tiny              # 2-core CPU, a few minutes
    python -m training.grpo.train --preset tiny --lora true  # adapters; the reference is the base with them off

It starts from an SFT checkpoint (default: runs/sft-PRESET, made first if missing) and trains on the
built-in arithmetic task: every step's batch is a rollout of groups of sampled answers
(training/grpo/rollout.py), every answer is scored by the exact-answer reward, and the loss is
`grpo_loss` (training/grpo/loss.py): the clipped ratio objective with advantages normalised within
each group and a k3 KL penalty to the frozen reference (`Reference`, training/posttrain.py),
averaged over tokens. A mixture-of-experts base keeps its family's auxiliary losses and
router-bias update (`with_aux_loss`, `family_on_step`). Logged per step:
reward, accuracy (exact answers among the samples), mean completion length, KL, clip ratio; the
reward curve is drawn to DIR/grpo.png. Before and after, greedy exact match on held-out questions.

A resumed run draws a fresh rollout at its first step (the previous rollout is not checkpointed),
so its batches after a resume are not bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass

from architectures import registry
from architectures.utils.command_line import command_line
from training import tasks
from training.chat import chat_format
from training.checks import check_in
from training.cli import parse, say
from training.recipes import Recipe
from architectures.utils.device import resolve_device
from training.grpo.loss import grpo_loss
from training.grpo.rollout import RLDataConfig, Rollouts, arithmetic_reward, token_logps
from training.plots import Curve, plot_curves
from training.posttrain import (family_on_step, method_saver, no_dropout, policy_and_reference, with_aux_loss,
                                write_summary)
from training.sft.finetune import sft_checkpoint
from training.tokenizer import Tokenizer
from training.train_config import TrainConfig
from training.trainer import train


@dataclass
class GRPOConfig:
    GROUP = "method"  # the title of these options in --help

    base: str = ""  # the SFT checkpoint to start from ("": runs/sft-PRESET, made first if missing)
    group_size: int = 8  # completions sampled per prompt (G): their mean reward is each one's baseline
    updates_per_rollout: int = 1  # optimizer steps on each rollout before sampling the next
    temperature: float = 1.0  # sampling temperature of the rollouts; the trained log-probs are softmax(logits / temperature)'s
    clip_eps: float = 0.2  # the ratio pi / pi_old is clipped to [1 - clip_eps, 1 + clip_eps]
    kl_coef: float = 0.04  # weight of the k3 KL penalty to the reference
    format_reward: float = 0.1  # reward for a reply that is a bare integer, right or wrong
    lora: bool = False  # train LoRA adapters only; the reference is the same model with adapters off
    lora_r: int = 16  # adapter rank with --lora


RECIPES = {
    "tiny": Recipe(
        model=GRPOConfig(),
        train=TrainConfig(max_steps=200, batch_size=128, block_size=64, lr=1e-4, min_lr=1e-5, warmup_steps=5,
                          weight_decay=0.0, grad_clip=1.0, eval_interval=200, eval_batches=1, log_interval=5),
        data=RLDataConfig(),
    ),
    "shakespeare": Recipe(
        model=GRPOConfig(group_size=16),
        train=TrainConfig(max_steps=300, batch_size=512, block_size=128, lr=1e-5, min_lr=1e-6, warmup_steps=10,
                          weight_decay=0.0, eval_interval=300, eval_batches=1, log_interval=10),
        data=RLDataConfig(train_prompts=50000, eval_examples=500, arithmetic_digits=3),
    ),
}


def grpo_step(model, batch: dict, frozen=None, *, clip_eps: float, kl_coef: float, temperature: float = 1.0):
    """The loop's loss: the current policy's log-probs of the rollout's tokens (at the rollouts'
    sampling temperature), into `grpo_loss`."""
    mask = batch["targets"] != -100
    logps = token_logps(model, batch["input_ids"], batch["targets"], temperature)
    loss, metrics = grpo_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], mask,
                              clip_eps=clip_eps, kl_coef=kl_coef)
    metrics.update(reward=batch["reward"].mean(), accuracy=batch["correct"].mean(), length=batch["length"].mean())
    return loss, metrics


def plot_rewards(metrics_path, path) -> None:
    rows = [json.loads(line) for line in open(metrics_path) if '"reward"' in line]
    steps = [r["step"] for r in rows]
    plot_curves([Curve("mean reward of the samples", steps, [r["reward"] for r in rows]),
                 Curve("exact answers among the samples", steps, [r["accuracy"] for r in rows])],
                path, size=(6, 3.5), dpi=120, grid=False)


def check_method(method: GRPOConfig, data_cfg: RLDataConfig, cfg: TrainConfig) -> None:
    """Every option that can be refused before an SFT model is made or loaded, NaN included."""
    if method.group_size < 2:
        raise ValueError(f"--group-size must be >= 2: a completion's baseline is the mean reward of its group, and a "
                         f"group of {method.group_size} has nothing to compare with")
    micro = cfg.batch_size // (int(os.environ.get("WORLD_SIZE", "1")) * cfg.grad_accum_steps)
    if micro % method.group_size:
        raise ValueError(f"each process's micro-batch of {micro} completions (--batch-size {cfg.batch_size}) does not "
                         f"divide into groups of --group-size {method.group_size}; make it a multiple")
    check_in("--temperature", method.temperature, "(0, inf)", "a group of greedy answers is one answer G times, "
             "and its advantages are all 0")
    check_in("--updates-per-rollout", method.updates_per_rollout, "[1, inf)")
    check_in("--clip-eps", method.clip_eps, "(0, inf)", "the ratio is kept within [1 - clip_eps, 1 + clip_eps]")
    check_in("--kl-coef", method.kl_coef, "[0, inf)", "0: no KL penalty")
    check_in("--format-reward", method.format_reward, "(-inf, inf)")
    check_in("--lora-r", method.lora_r, "[1, inf)", "the adapters' rank")
    for flag, value in (("--train-prompts", data_cfg.train_prompts), ("--eval-examples", data_cfg.eval_examples),
                        ("--arithmetic-digits", data_cfg.arithmetic_digits),
                        ("--max-new-tokens", data_cfg.max_new_tokens)):
        check_in(flag, value, "[1, inf)")


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "grpo", prog="python -m training.grpo.train",
                 about="GRPO: reinforcement learning of an SFT model from a verifiable reward, with a group baseline")
    t_start = time.perf_counter()
    method, data_cfg, cfg = args.recipe.model, args.recipe.data, args.recipe.train
    check_method(method, data_cfg, cfg)
    base = sft_checkpoint(args.preset, method.base)
    device = resolve_device(cfg.device)
    model = registry.from_pretrained(base, device=device)
    no_dropout(model)
    tokenizer = Tokenizer.from_file(base)
    fmt = chat_format(tokenizer)
    examples = {"train": tasks.arithmetic("train", data_cfg.train_prompts, seed=2, max_digits=data_cfg.arithmetic_digits),
                "val": tasks.arithmetic("test", data_cfg.eval_examples, max_digits=data_cfg.arithmetic_digits)}
    reference = policy_and_reference(model, method.lora, method.lora_r)
    rollouts = Rollouts(model, reference, fmt, examples, method.group_size, method.updates_per_rollout,
                        method.temperature, data_cfg.max_new_tokens,
                        functools.partial(arithmetic_reward, format_weight=method.format_reward))
    before = tasks.exact_match(model, fmt, examples["val"], data_cfg.max_new_tokens)
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters from {base}; GRPO with groups of "
        f"{method.group_size}, {cfg.batch_size // method.group_size} prompts per rollout, {method.updates_per_rollout} "
        f"updates per rollout, {cfg.max_steps} steps into {args.out}")
    step = functools.partial(grpo_step, clip_eps=method.clip_eps, kl_coef=method.kl_coef,
                             temperature=method.temperature)
    result = train(model, with_aux_loss(step, model), rollouts, cfg, args.out,
                   save_model=method_saver(model, tokenizer, base, method.lora), resume=args.resume,
                   on_step=family_on_step(model),
                   config_record={"method": dataclasses.asdict(method), "data": dataclasses.asdict(data_cfg),
                                  "base": str(base), "chat_format": fmt.name}, loss_label="train loss (grpo)")
    after = tasks.exact_match(model, fmt, examples["val"], data_cfg.max_new_tokens)
    plot_rewards(args.out / "metrics.jsonl", args.out / "grpo.png")
    say(f"held-out exact match, arithmetic: {before:.1%} (the SFT model) -> {after:.1%} after GRPO "
        f"({len(examples['val'])} questions, greedy); reward curve in {args.out / 'grpo.png'}")
    summary = {"base": str(base), "preset": args.preset, "steps": result.step, "exact_match_before": before,
               "exact_match_after": after, "train_s": result.elapsed_s}
    return write_summary(args.out, summary, t_start, device, "checkpoint, metrics.jsonl, loss.png and grpo.png")


if __name__ == "__main__":
    main()

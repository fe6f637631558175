"""PPO from a learned reward model, the RLHF recipe of Stiennon et al. (2020) and InstructGPT (2022).

    python -m training.reward.train --preset tiny --base runs/sft-tiny --out runs/reward-tiny   # first
    python -m training.ppo.train --preset tiny --base runs/sft-tiny --reward-model runs/reward-tiny

It starts from an SFT checkpoint (default: runs/sft-PRESET, made first if missing) and a reward
model (training/reward/: a zoo checkpoint with a scalar head and its marker; a directory without
one is refused before anything loads). Three more models come from those two: the reference (a
frozen copy of the SFT model, whose KL to the policy is charged in the reward), the value model
(initialised from the reward model, as Huang et al. 2024 do, and trained with the policy under one
optimizer: `PolicyAndValue`), and the frozen reward model itself. Every `epochs` x `minibatches`
steps a rollout of replies is sampled and scored (training/ppo/rollout.py); every step is one
minibatch of it through `ppo_policy_loss` + vf_coef x `ppo_value_loss` (training/ppo/loss.py).
Logged: the reward model's score, the KL to the reference (summed over a reply), the return, the
exact answers among the samples (the task's checker, which PPO never sees), entropy, the two
losses, both clip fractions, the approximate KL of each update and the value model's explained
variance. Held-out exact match (greedy) is measured before and after.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from architectures import registry
from architectures.utils.command_line import command_line
from architectures.utils.device import resolve_device
from training import tasks
from training.chat import chat_format
from training.checks import check_in
from training.cli import checkpoint_saver, parse, say
from training.grpo.rollout import RLDataConfig, arithmetic_reward
from training.plots import Curve, plot_curves
from training.posttrain import family_on_step, no_dropout, policy_and_reference, with_aux_loss, write_summary
from training.optimizer import make_optimizer
from training.ppo.loss import check_unit_interval, entropy, masked_mean, ppo_policy_loss, ppo_value_loss
from training.ppo.rollout import BASELINES, PolicyAndValue, PPORollouts
from training.recipes import Recipe
from training.reward.model import load_scalar_model, save_scalar_model
from training.sft.finetune import sft_checkpoint
from training.tokenizer import Tokenizer
from training.train_config import TrainConfig
from training.trainer import train


@dataclass
class PPOConfig:
    GROUP = "method"  # the title of these options in --help

    base: str = ""  # the SFT checkpoint to start from ("": runs/sft-PRESET, made first if missing)
    reward_model: str = "runs/reward-tiny"  # a reward model directory (python -m training.reward.train); its scores are the reward
    kl_coef: float = 0.05  # beta: each reply token is rewarded -beta (log pi_old - log pi_ref)
    gamma: float = 1.0  # discount per token (1: the score at the end counts fully at every token)
    lam: float = 0.95  # GAE's lambda: 0 bootstraps from the next value (low variance, biased), 1 sums the rewards
    clip_eps: float = 0.2  # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    clip_value: float = 0.2  # a value prediction is clipped to within clip_value of the rollout's
    vf_coef: float = 0.1  # weight of the value loss beside the policy loss
    epochs: int = 4  # passes over each rollout
    minibatches: int = 4  # minibatches per pass: a rollout is batch_size x minibatches replies
    temperature: float = 1.0  # sampling temperature; the trained log-probs are softmax(logits / temperature)'s
    missing_eos_penalty: float = 1.0  # subtracted from the score of a reply cut off before its end-of-turn
    whiten_advantages: bool = True  # normalise the advantages over each rollout to mean 0, std 1
    score_baseline: str = "none"  # taken from each reply's score: "none", or "greedy" (the greedy reply's score)
    value_lr: float = 0.0  # the value model's peak learning rate (0: --lr, as the policy's); the same schedule
    value_warmup_steps: int = 0  # first steps that train the value model alone, the policy held at the SFT model


RECIPES = {
    "tiny": Recipe(  # notes/ppo.md: rollouts of 256 replies at temperature 0.5, 2 updates of all of them each
        model=PPOConfig(epochs=2, minibatches=1, temperature=0.5, value_lr=1e-3),
        train=TrainConfig(max_steps=600, batch_size=256, block_size=64, lr=1e-4, min_lr=1e-5, warmup_steps=5,
                          weight_decay=0.0, grad_clip=1.0, eval_interval=600, eval_batches=1, log_interval=8),
        data=RLDataConfig(),
    ),
    "shakespeare": Recipe(
        model=PPOConfig(reward_model="runs/reward-shakespeare"),
        train=TrainConfig(max_steps=400, batch_size=128, block_size=128, lr=1e-5, min_lr=1e-6, warmup_steps=10,
                          weight_decay=0.0, eval_interval=400, eval_batches=1, log_interval=16),
        data=RLDataConfig(train_prompts=50000, eval_examples=500, arithmetic_digits=3),
    ),
}


def ppo_step(model: PolicyAndValue, batch: dict, *, clip_eps: float, clip_value: float, vf_coef: float,
             temperature: float = 1.0):
    """The loop's loss on one minibatch: the policy's log-probs and entropy, the value model's
    predictions, the clipped policy loss + vf_coef x the clipped value loss; the rollout's statistics
    of these rows are logged beside them."""
    targets = batch["targets"]
    mask = targets != -100
    policy_weight = batch["policy_weight"][0] if "policy_weight" in batch else 1.0  # 0 in the value warm-up
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(policy_weight)):
        # In the warm-up the policy is left out of the graph: its gradients stay None, so AdamW keeps
        # no state for it (zero gradients would be counted in its bias correction, changing the first real updates).
        logits = model.policy(batch["input_ids"]).float() / temperature  # (B, T, V)
    logps = torch.gather(torch.log_softmax(logits, -1), -1, targets.clamp_min(0)[..., None])[..., 0] * mask
    values = model.value(batch["input_ids"])  # (B, T)
    policy_loss, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_eps)
    value_loss, value_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip_value)
    with torch.no_grad():
        metrics.update(value_metrics, policy_loss=policy_loss.detach(), value_loss=value_loss.detach(),
                       entropy=entropy(logits.detach(), mask), score=batch["score"].mean(), kl=batch["kl_sum"].mean(),
                       **{"return": batch["return"].mean()}, accuracy=batch["correct"].mean(),
                       length=batch["length"].mean(), explained_variance=batch["explained_variance"].mean(),
                       value_mean=masked_mean(values.detach(), mask))
        if "greedy_correct" in batch:  # the policy's greedy answers to the rollout's prompts
            metrics["greedy_accuracy"] = batch["greedy_correct"].mean()
    return policy_weight * policy_loss + vf_coef * value_loss, metrics


def check_method(method: PPOConfig, data_cfg: RLDataConfig) -> None:
    """Every option that can be refused before a model is loaded, the reward model's marker included."""
    check_in("--kl-coef", method.kl_coef, "[0, inf)", "0: no KL penalty in the reward")
    check_unit_interval("--gamma", method.gamma)
    check_unit_interval("--lam", method.lam)
    check_in("--clip-eps", method.clip_eps, "(0, inf)", "the ratio is kept within [1 - clip_eps, 1 + clip_eps]")
    check_in("--clip-value", method.clip_value, "(0, inf)")
    check_in("--vf-coef", method.vf_coef, "[0, inf)")
    check_in("--epochs", method.epochs, "[1, inf)")
    check_in("--minibatches", method.minibatches, "[1, inf)")
    check_in("--temperature", method.temperature, "(0, inf)", "the policy samples its replies")
    check_in("--missing-eos-penalty", method.missing_eos_penalty, "(-inf, inf)")
    if method.score_baseline not in BASELINES:
        raise ValueError(f"--score-baseline must be one of {', '.join(BASELINES)}, got {method.score_baseline!r}")
    check_in("--value-lr", method.value_lr, "[0, inf)", "0: the value model learns at --lr")
    check_in("--value-warmup-steps", method.value_warmup_steps, "[0, inf)", "0: the policy trains from the first step")
    for flag, value in (("--train-prompts", data_cfg.train_prompts), ("--eval-examples", data_cfg.eval_examples),
                        ("--arithmetic-digits", data_cfg.arithmetic_digits),
                        ("--max-new-tokens", data_cfg.max_new_tokens)):
        check_in(flag, value, "[1, inf)")
    if not method.reward_model:
        raise ValueError("--reward-model is empty; train one with python -m training.reward.train --out DIR and pass DIR")
    from training.reward.model import HEAD_MARKER
    where = Path(method.reward_model)
    if not (where / HEAD_MARKER).is_file():  # refused now, in load_scalar_model's words, not after the SFT model loads
        load_scalar_model(where)


def ppo_optimizer(value_lr: float):
    """The loop's `make_optimizer`: AdamW as the default's, with the value model's groups at value_lr
    (the warm-up and cosine schedule scale every group alike); value_lr 0 leaves one learning rate."""
    def make(model: PolicyAndValue, cfg: TrainConfig, device) -> torch.optim.Optimizer:
        optimizer = make_optimizer(model, cfg, device)
        if not value_lr:
            return optimizer
        value_params = {id(p) for p in model.value.parameters()}
        groups = []
        for group in optimizer.param_groups:
            for is_value in (False, True):
                params = [p for p in group["params"] if (id(p) in value_params) == is_value]
                if params:
                    groups.append({"params": params, "weight_decay": group["weight_decay"],
                                   "lr": value_lr if is_value else cfg.lr})
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    return make


def policy_saver(tokenizer: Tokenizer):
    """The loop's `save_model`: the policy as its family's checkpoint with the tokenizer, the value model in value/."""
    def save_model(model: PolicyAndValue, directory: Path, state_dict=None) -> None:
        policy_state = value_state = None
        if state_dict is not None:
            policy_state = {k[7:]: v for k, v in state_dict.items() if k.startswith("policy.")}
            value_state = {k[6:]: v for k, v in state_dict.items() if k.startswith("value.")}
        checkpoint_saver(registry.family(registry.family_of(model.policy)).save_pretrained, tokenizer)(
            model.policy, directory, policy_state)
        save_scalar_model(model.value, directory / "value", state_dict=value_state, role="value")
    return save_model


def plot_ppo(metrics_path: Path, path: Path) -> None:
    from architectures.utils.files import read_jsonl

    rows = [r for r in read_jsonl(metrics_path) if "score" in r]
    steps = [r["step"] for r in rows]
    plot_curves([Curve("reward model's score", steps, [r["score"] for r in rows]),
                 Curve("exact answers among the samples", steps, [r["accuracy"] for r in rows]),
                 Curve("KL to the reference (per reply)", steps, [r["kl"] for r in rows])],
                path, size=(6, 3.5), dpi=120, grid=False)


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "ppo", prog="python -m training.ppo.train",
                 about="PPO: reinforcement learning of an SFT model from a learned reward model, with a value model, "
                       "GAE and a KL penalty to the reference in the reward")
    t_start = time.perf_counter()
    method, data_cfg, cfg = args.recipe.model, args.recipe.data, args.recipe.train
    check_method(method, data_cfg)
    base = sft_checkpoint(args.preset, method.base)
    device = resolve_device(cfg.device)
    policy = registry.from_pretrained(base, device=device)
    no_dropout(policy)
    tokenizer = Tokenizer.from_file(base)
    fmt = chat_format(tokenizer)
    reward_model = load_scalar_model(method.reward_model, device=device).eval().requires_grad_(False)
    value = load_scalar_model(method.reward_model, device=device)  # the value model starts as the reward model
    no_dropout(value)
    model = PolicyAndValue(policy, value)
    examples = {"train": tasks.arithmetic("train", data_cfg.train_prompts, seed=2, max_digits=data_cfg.arithmetic_digits),
                "val": tasks.arithmetic("test", data_cfg.eval_examples, max_digits=data_cfg.arithmetic_digits)}
    reference = policy_and_reference(policy, False, 0)
    checker = functools.partial(arithmetic_reward, format_weight=0.0)
    rollouts = PPORollouts(model, reference, reward_model, fmt, examples, checker, epochs=method.epochs,
                           minibatches=method.minibatches, temperature=method.temperature,
                           max_new_tokens=data_cfg.max_new_tokens, kl_coef=method.kl_coef, gamma=method.gamma,
                           lam=method.lam, missing_eos_penalty=method.missing_eos_penalty,
                           whiten_advantages=method.whiten_advantages,
                           value_warmup_steps=method.value_warmup_steps, score_baseline=method.score_baseline)
    before = tasks.exact_match(policy, fmt, examples["val"], data_cfg.max_new_tokens)
    say(f"model: {sum(p.numel() for p in policy.parameters()):,} policy parameters from {base}, reward and value "
        f"models from {method.reward_model}; PPO on rollouts of {cfg.batch_size * method.minibatches} replies, "
        f"{method.epochs} epochs x {method.minibatches} minibatches each, {cfg.max_steps} steps into {args.out}")
    step = functools.partial(ppo_step, clip_eps=method.clip_eps, clip_value=method.clip_value,
                             vf_coef=method.vf_coef, temperature=method.temperature)
    hook = family_on_step(policy)
    result = train(model, with_aux_loss(step, policy), rollouts, cfg, args.out, save_model=policy_saver(tokenizer),
                   make_optimizer=ppo_optimizer(method.value_lr),
                   resume=args.resume, on_step=(lambda done, m: hook(done, m.policy)) if hook else None,
                   config_record={"method": dataclasses.asdict(method), "data": dataclasses.asdict(data_cfg),
                                  "base": str(base), "chat_format": fmt.name}, loss_label="train loss (ppo)")
    after = tasks.exact_match(policy, fmt, examples["val"], data_cfg.max_new_tokens)
    plot_ppo(args.out / "metrics.jsonl", args.out / "ppo.png")
    say(f"held-out exact match, arithmetic: {before:.1%} (the SFT model) -> {after:.1%} after PPO "
        f"({len(examples['val'])} questions, greedy); curves in {args.out / 'ppo.png'}")
    summary = {"base": str(base), "reward_model": method.reward_model, "preset": args.preset, "steps": result.step,
               "replies_sampled": -(-result.step // (method.epochs * method.minibatches)) * cfg.batch_size * method.minibatches,
               "exact_match_before": before, "exact_match_after": after, "train_s": result.elapsed_s}
    return write_summary(args.out, summary, t_start, device, "checkpoint (value model in value/), metrics.jsonl, ppo.png")


if __name__ == "__main__":
    main()

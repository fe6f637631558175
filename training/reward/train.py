"""A reward model: a scalar head on an SFT model, fitted to preference pairs with the Bradley-Terry loss.

    python -m training.reward.train --preset tiny --base runs/sft-tiny --pairs-from runs/sft-weak-500
    # 2-core CPU, about 9 minutes; 97.4% held-out pairwise accuracy (notes/ppo.md)

The trunk starts from an SFT checkpoint (default: runs/sft-PRESET, made first if missing) and a
new head, hidden size -> 1 (`ScalarModel`, training/reward/model.py). The pairs come from the
built-in arithmetic task (training/reward/data.py): DPO's pairs (the right answer over the SFT
model's own mistake, or a near miss) and pairs of the SFT model's sampled replies ranked by the
task's checker. The replies are the trunk's own, or those of `--pairs-from DIR` (the model PPO
will train, when the trunk is a stronger one). The loss is `bradley_terry_loss`; held-out pairwise accuracy on both kinds of
pairs from the test split's questions is measured before and after. At the end the head is
rescaled so that the training replies score mean 0 and std 1 (`ScalarModel.normalise`) and the
directory is rewritten: the trunk's checkpoint, its tokenizer, the head and its marker, which is
what `python -m training.ppo.train --reward-model DIR` loads (the loop's resumable train_state
holds the weights from before the rescaling).
"""

from __future__ import annotations

import dataclasses
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
from training.cli import parse, say
from training.dpo.data import arithmetic_pairs
from training.posttrain import family_on_step, with_aux_loss, write_summary
from training.recipes import Recipe
from training.reward.data import SideBatches, collate_sides, encode_pair_sides, ranked_pairs
from training.reward.loss import bradley_terry_loss
from training.reward.model import ScalarModel, save_scalar_model
from training.sft.finetune import sft_checkpoint
from training.tokenizer import Tokenizer
from training.train_config import TrainConfig
from training.trainer import train


@dataclass
class RewardConfig:
    GROUP = "method"  # the title of these options in --help

    base: str = ""  # the SFT checkpoint the trunk starts from ("": runs/sft-PRESET, made first if missing)
    pairs_from: str = ""  # the checkpoint whose sampled replies make the pairs ("": the base); the policy PPO will train
    samples: int = 8  # replies sampled per question (temperature 1) for the checker-ranked pairs
    pairs_per_question: int = 4  # checker-ranked pairs kept per question
    dpo_pairs: bool = True  # also train on DPO's pairs (right answer over the model's own mistake or a near miss)
    likelihood: bool = False  # add the trunk's log-likelihood of the reply to the score, with a learned weight


@dataclass
class RewardDataConfig:
    train_questions: int = 4000  # built-in arithmetic questions the training pairs are made from
    test_questions: int = 200  # held-out questions the accuracy is measured on
    arithmetic_digits: int = 2  # as the SFT run's
    max_new_tokens: int = 8  # longest sampled reply


RECIPES = {
    "tiny": Recipe(
        model=RewardConfig(),
        train=TrainConfig(max_steps=1200, batch_size=32, block_size=64, lr=5e-4, min_lr=5e-5, warmup_steps=20,
                          weight_decay=0.0, eval_interval=100, eval_batches=4, log_interval=10),
        data=RewardDataConfig(),
    ),
    "shakespeare": Recipe(
        model=RewardConfig(),
        train=TrainConfig(max_steps=1000, batch_size=64, block_size=128, lr=1e-4, min_lr=1e-5, warmup_steps=50,
                          weight_decay=0.0, eval_interval=200, eval_batches=8, log_interval=20),
        data=RewardDataConfig(train_questions=20000, test_questions=500, arithmetic_digits=3),
    ),
}


def reward_step(model: ScalarModel, batch: dict) -> tuple[torch.Tensor, dict]:
    """The loop's loss: both replies of each pair through the model in one pass, scored at their last token."""
    n = batch["chosen_ids"].shape[0]
    scores = model.score(*(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("ids", "last", "first")))
    return bradley_terry_loss(scores[:n], scores[n:])


@torch.no_grad()
def pair_accuracy(model: ScalarModel, pairs: list, pad_id: int, batch_size: int = 128) -> float:
    """The fraction of pairs whose chosen reply the model scores above the rejected one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0.0
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_sides(pairs[i:i + batch_size], pad_id).items()}
        right += float(reward_step(model, batch)[1]["accuracy"]) * min(batch_size, len(pairs) - i)
    model.train(was_training)
    return right / len(pairs)


@torch.no_grad()
def reply_scores(model: ScalarModel, pairs: list, pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """The scores of every reply of these pairs, chosen and rejected."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        b = {k: v.to(device) for k, v in collate_sides(pairs[i:i + batch_size], pad_id).items()}
        out.append(model.score(*(torch.cat([b[f"chosen_{k}"], b[f"rejected_{k}"]]) for k in ("ids", "last", "first"))).cpu())
    return torch.cat(out)


def check_method(method: RewardConfig, data_cfg: RewardDataConfig) -> None:
    for flag, value in (("--samples", method.samples), ("--pairs-per-question", method.pairs_per_question),
                        ("--train-questions", data_cfg.train_questions),
                        ("--test-questions", data_cfg.test_questions),
                        ("--arithmetic-digits", data_cfg.arithmetic_digits),
                        ("--max-new-tokens", data_cfg.max_new_tokens)):
        check_in(flag, value, "[1, inf)")


def make_pairs(model, fmt, method: RewardConfig, data_cfg: RewardDataConfig, block: int):
    """(training pairs, held-out pairs by kind), encoded."""
    digits, new = data_cfg.arithmetic_digits, data_cfg.max_new_tokens
    train_q = tasks.arithmetic("train", data_cfg.train_questions, seed=3, max_digits=digits)
    test_q = tasks.arithmetic("test", data_cfg.test_questions, max_digits=digits)
    train = ranked_pairs(model, fmt, train_q, method.samples, method.pairs_per_question, seed=3, max_new_tokens=new)
    say(f"data: {len(train):,} checker-ranked training pairs from {len(train_q):,} questions")
    if method.dpo_pairs:
        dpo, own = arithmetic_pairs(model, fmt, train_q, seed=4, max_new_tokens=new)
        train += dpo
        say(f"data: + {len(dpo):,} DPO pairs ({own:,} rejected replies are the model's own mistakes)")
    held = {"ranked": ranked_pairs(model, fmt, test_q, method.samples, method.pairs_per_question, seed=5,
                                   max_new_tokens=new),
            "dpo": arithmetic_pairs(model, fmt, test_q, seed=6, max_new_tokens=new)[0]}
    return encode_pair_sides(train, fmt, block + 1), {k: encode_pair_sides(v, fmt, block + 1) for k, v in held.items()}


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "reward", prog="python -m training.reward.train",
                 about="A reward model: a scalar head on an SFT model, trained with the Bradley-Terry loss on "
                       "preference pairs of the arithmetic task")
    t_start = time.perf_counter()
    method, data_cfg, cfg = args.recipe.model, args.recipe.data, args.recipe.train
    check_method(method, data_cfg)
    if method.pairs_from and not (Path(method.pairs_from) / "config.json").is_file():
        raise FileNotFoundError(f"--pairs-from {method.pairs_from} has no config.json; pass a checkpoint directory")
    base = sft_checkpoint(args.preset, method.base)
    device = resolve_device(cfg.device)
    trunk = registry.from_pretrained(base, device=device)
    tokenizer = Tokenizer.from_file(base)
    fmt = chat_format(tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    sampler = registry.from_pretrained(method.pairs_from, device=device) if method.pairs_from else trunk
    if method.pairs_from:
        say(f"data: the pairs are {method.pairs_from}'s sampled replies; the trunk starts from {base}")
    train_pairs, held = make_pairs(sampler, fmt, method, data_cfg, cfg.block_size)
    del sampler
    torch.manual_seed(cfg.seed)
    model = ScalarModel(trunk, likelihood=method.likelihood).to(device)
    before = {k: pair_accuracy(model, v, pad) for k, v in held.items()}
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters from {base} and a new head"
        f"{' with a likelihood term' if method.likelihood else ''}; "
        f"{cfg.max_steps} steps into {args.out}")
    hook = family_on_step(trunk)
    train(model, with_aux_loss(reward_step, trunk), SideBatches(train_pairs, held["ranked"], pad), cfg, args.out,
          save_model=lambda m, d, state=None: save_scalar_model(m, d, tokenizer, state), resume=args.resume, on_step=(lambda step, m: hook(step, m.trunk)) if hook else None,
          config_record={"method": dataclasses.asdict(method), "data": dataclasses.asdict(data_cfg), "base": str(base),
                         "chat_format": fmt.name}, loss_label="train loss (bradley-terry)")
    after = {k: pair_accuracy(model, v, pad) for k, v in held.items()}
    model.normalise(reply_scores(model, train_pairs, pad))
    save_scalar_model(model, args.out, tokenizer)
    if method.likelihood:
        say(f"likelihood weight after training: {float(model.likelihood_weight.detach()):.3f} (after normalising the scores)")
    for kind, pairs in held.items():
        say(f"held-out pairwise accuracy, {kind} pairs: {before[kind]:.1%} (new head) -> {after[kind]:.1%} "
            f"({len(pairs)} pairs)")
    summary = {"base": str(base), "preset": args.preset, "steps": cfg.max_steps, "train_pairs": len(train_pairs),
               "accuracy_before": before, "accuracy_after": after,
               "likelihood_weight": None if model.likelihood_weight is None else float(model.likelihood_weight.detach()),
               "held_out_pairs": {k: len(v) for k, v in held.items()}}
    return write_summary(args.out, summary, t_start, device, "reward model (trunk, head, marker), metrics.jsonl")


if __name__ == "__main__":
    main()

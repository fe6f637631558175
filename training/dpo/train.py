"""Direct preference optimisation of the SFT model on preference pairs, on the shared loop.

    python -m training.dpo.train --preset tiny                     # 2-core CPU, a few minutes
    python -m training.dpo.train --preset tiny --lora true         # adapters; the reference is the base with them off
    python -m training.dpo.train --preset tiny --loss-type ipo     # or hinge; --label-smoothing for conservative DPO
    python -m training.dpo.train --preset tiny --dataset prefs.jsonl   # your own prompt/chosen/rejected rows

It starts from an SFT checkpoint (default: runs/sft-PRESET, made first by training/sft/train.py if
missing), builds preference pairs from the built-in arithmetic task with the model's own wrong
answers as the rejected replies (training/dpo/data.py), and minimises `dpo_loss` against a frozen
reference (`Reference`, training/posttrain.py): a copy of the starting model passed to the loop as
`frozen={"reference": ...}`, or, with --lora, the same model with its adapters switched off
(`disable_adapters`), which costs no second copy. A mixture-of-experts base keeps its family's
auxiliary losses and router-bias update (`with_aux_loss`, `family_on_step`). Logged as TRL logs it: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies. Before and after it reports held-out preference accuracy (how often the
implicit reward ranks the chosen reply above the rejected one), exact match on the held-out
arithmetic questions, and the KL from the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from architectures import registry
from architectures.utils.command_line import command_line
from training import tasks
from training.chat import chat_format
from training.checks import check_in
from training.cli import parse, say
from training.recipes import Recipe
from architectures.utils.device import resolve_device
from training.dpo.data import PairBatches, arithmetic_pairs, collate, encode_pairs, load_pairs
from training.dpo.loss import LOSS_TYPES, dpo_loss, dpo_metrics, sequence_logps
from training.posttrain import (Reference, family_on_step, method_saver, policy_and_reference, with_aux_loss,
                                 write_summary)
from training.sft.finetune import sft_checkpoint
from training.tokenizer import Tokenizer
from training.train_config import TrainConfig
from training.trainer import train


@dataclass
class DPOConfig:
    GROUP = "method"  # the title of these options in --help

    base: str = ""  # the SFT checkpoint to start from ("": runs/sft-PRESET, made first if missing)
    beta: float = 0.1  # strength of the KL constraint: the implicit reward is beta * log(pi / pi_ref)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO), "ipo" or "hinge"
    label_smoothing: float = 0.0  # conservative DPO: the assumed probability that a label is flipped
    rpo_alpha: float = 0.0  # weight of the chosen reply's NLL added to the loss (RPO), which keeps the right answer likely
    lora: bool = False  # train LoRA adapters only; the reference is the same model with adapters off
    lora_r: int = 16  # adapter rank with --lora


@dataclass
class PreferenceDataConfig:
    dataset: str = "builtin"  # "builtin" (arithmetic pairs, rejected = the model's own mistakes) or a prompt/chosen/rejected file or hub name
    train_pairs: int = 2000  # built-in pairs to train on
    test_pairs: int = 200  # held-out pairs (the SFT run's held-out arithmetic questions)
    arithmetic_digits: int = 2  # as the SFT run's
    max_new_tokens: int = 8  # longest reply sampled or scored


RECIPES = {
    "tiny": Recipe(
        model=DPOConfig(),
        train=TrainConfig(max_steps=150, batch_size=32, block_size=64, lr=5e-5, min_lr=5e-6, warmup_steps=10,
                          weight_decay=0.0, eval_interval=50, eval_batches=4, log_interval=10),
        data=PreferenceDataConfig(),
    ),
    "shakespeare": Recipe(
        model=DPOConfig(),
        train=TrainConfig(max_steps=300, batch_size=64, block_size=128, lr=1e-4, min_lr=1e-5, warmup_steps=20,
                          weight_decay=0.0, eval_interval=100, eval_batches=8, log_interval=20),
        data=PreferenceDataConfig(train_pairs=10000, test_pairs=500, arithmetic_digits=3),
    ),
}


def dpo_step(model, batch: dict, frozen=None, *, beta: float, loss_type: str, label_smoothing: float,
             rpo_alpha: float = 0.0):
    """The loop's loss: both replies of each pair through the policy and the reference in one pass each
(the reference: `frozen["reference"]`, or with none, the policy with its LoRA adapters off).

    With rpo_alpha > 0, plus rpo_alpha x the mean NLL per token of the chosen replies, as TRL's
    rpo_alpha adds it ("Iterative Reasoning Preference Optimization", Pang et al. 2024,
    arXiv:2404.19733): the sigmoid loss alone can widen the margin by lowering both replies."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2n, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    n = batch["chosen_input_ids"].shape[0]
    logps = sequence_logps(model(ids), labels)  # (2n,)
    ref = sequence_logps(Reference.from_frozen(frozen).logits(model, ids), labels)
    losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type,
                                        label_smoothing=label_smoothing)
    metrics = dpo_metrics(chosen, rejected)
    loss = losses.mean()
    if rpo_alpha:
        nll = -logps[:n].sum() / (batch["chosen_labels"] != -100).sum().clamp_min(1)
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


@torch.no_grad()
def held_out(model, reference: Reference, pairs, block: int, pad: int, step,
             batch_size: int = 64) -> dict[str, float]:
    """Preference accuracy and mean margin over the held-out pairs, and the per-token KL(policy || reference)
    on their chosen replies (the exact KL of the two next-token distributions, averaged over reply tokens)."""
    model.eval()
    acc, margin, kl_sum, kl_n = 0.0, 0.0, 0.0, 0
    for i in range(0, len(pairs), batch_size):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(pairs[i:i + batch_size], block, pad).items()}
        n = batch["chosen_input_ids"].shape[0]
        _, m = step(model, batch, reference.frozen)
        acc += float(m["rewards/accuracies"]) * n
        margin += float(m["rewards/margins"]) * n
        mask = batch["chosen_labels"] != -100
        logp = F.log_softmax(model(batch["chosen_input_ids"]).float(), -1)[mask]  # (tokens, V)
        logq = F.log_softmax(reference.logits(model, batch["chosen_input_ids"]).float(), -1)[mask]
        kl_sum += float((logp.exp() * (logp - logq)).sum())
        kl_n += int(mask.sum())
    model.train()
    return {"preference_accuracy": acc / len(pairs), "margin": margin / len(pairs), "kl_per_token": kl_sum / max(kl_n, 1)}


def check_method(method: DPOConfig, data_cfg: PreferenceDataConfig) -> None:
    """Every option that can be refused before an SFT model is made or loaded, NaN included."""
    check_in("--beta", method.beta, "(0, inf)", "it scales the implicit reward; 0.1 is usual")
    if method.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss-type {method.loss_type!r} is not one of {LOSS_TYPES}")
    check_in("--label-smoothing", method.label_smoothing, "[0, 0.5)",
             "the probability that a preference label is flipped; at 0.5 the labels say nothing")
    if method.label_smoothing and method.loss_type != "sigmoid":
        raise ValueError(f"--label-smoothing is conservative DPO's, a variant of the sigmoid loss; --loss-type "
                         f"{method.loss_type} does not use it (pass --label-smoothing 0)")
    check_in("--rpo-alpha", method.rpo_alpha, "[0, inf)", "the weight of the chosen reply's NLL; 0 turns it off")
    check_in("--lora-r", method.lora_r, "[1, inf)", "the adapters' rank")
    for flag, value in (("--train-pairs", data_cfg.train_pairs), ("--test-pairs", data_cfg.test_pairs),
                        ("--arithmetic-digits", data_cfg.arithmetic_digits),
                        ("--max-new-tokens", data_cfg.max_new_tokens)):
        check_in(flag, value, "[1, inf)")


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "dpo", prog="python -m training.dpo.train",
                 about="Direct preference optimisation of an SFT model on (prompt, chosen, rejected) pairs")
    t_start = time.perf_counter()
    method, data_cfg, cfg = args.recipe.model, args.recipe.data, args.recipe.train
    check_method(method, data_cfg)
    # Pairs from a file or the hub are read and checked first: before an SFT model is made or loaded.
    given_pairs = load_pairs(data_cfg.dataset) if data_cfg.dataset != "builtin" else None
    base = sft_checkpoint(args.preset, method.base)
    device = resolve_device(cfg.device)
    model = registry.from_pretrained(base, device=device)
    tokenizer = Tokenizer.from_file(base)
    fmt = chat_format(tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    test_examples = tasks.arithmetic("test", data_cfg.test_pairs, max_digits=data_cfg.arithmetic_digits)
    if data_cfg.dataset == "builtin":
        train_examples = tasks.arithmetic("train", data_cfg.train_pairs, seed=1, max_digits=data_cfg.arithmetic_digits)
        train_pairs, own = arithmetic_pairs(model, fmt, train_examples, seed=1, max_new_tokens=data_cfg.max_new_tokens)
        say(f"data: {len(train_pairs):,} training pairs from the arithmetic task; {own:,} rejected replies are the "
            f"model's own mistakes (sampled at temperature 1), the rest near misses")
    else:
        train_pairs = given_pairs
        say(f"data: {len(train_pairs):,} preference pairs from {data_cfg.dataset}")
    test_pairs, _ = arithmetic_pairs(model, fmt, test_examples, seed=2, max_new_tokens=data_cfg.max_new_tokens)
    train_enc = encode_pairs(train_pairs, fmt, cfg.block_size)
    test_enc = encode_pairs(test_pairs, fmt, cfg.block_size)
    batches = PairBatches(train_enc, test_enc, cfg.block_size, pad)

    reference = policy_and_reference(model, method.lora, method.lora_r)
    step = functools.partial(dpo_step, beta=method.beta, loss_type=method.loss_type,
                             label_smoothing=method.label_smoothing, rpo_alpha=method.rpo_alpha)
    em_before = tasks.exact_match(model, fmt, test_examples, data_cfg.max_new_tokens)
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters from {base}; DPO ({method.loss_type}, "
        f"beta {method.beta}) for {cfg.max_steps} steps into {args.out}")
    result = train(model, with_aux_loss(step, model), batches, cfg, args.out,
                   save_model=method_saver(model, tokenizer, base, method.lora), resume=args.resume,
                   frozen=reference.frozen, on_step=family_on_step(model),
                   config_record={"method": dataclasses.asdict(method), "data": dataclasses.asdict(data_cfg),
                                  "base": str(base), "chat_format": fmt.name},
                   loss_label=f"train loss (dpo {method.loss_type})")
    after = held_out(model, reference.to(device), test_enc, cfg.block_size, pad, step)
    em_after = tasks.exact_match(model, fmt, test_examples, data_cfg.max_new_tokens)
    say(f"held-out preference accuracy: {after['preference_accuracy']:.1%} (chosen ranked above rejected, "
        f"{len(test_enc)} pairs; mean margin {after['margin']:.3f}); KL(policy || reference) "
        f"{after['kl_per_token']:.4f} nats per reply token")
    say(f"held-out exact match, arithmetic: {em_before:.1%} (the SFT model) -> {em_after:.1%} after DPO "
        f"({len(test_examples)} questions)")
    summary = {"base": str(base), "preset": args.preset, "steps": result.step, **after,
               "exact_match_before": em_before, "exact_match_after": em_after, "train_s": result.elapsed_s}
    return write_summary(args.out, summary, t_start, device, "checkpoint, metrics.jsonl and loss.png")


if __name__ == "__main__":
    main()

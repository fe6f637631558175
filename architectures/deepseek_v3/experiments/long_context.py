"""Experiment: extend a DeepSeek-V3 trained at 256 tokens of context to 1024, the way Kimi K2 and
DeepSeek-V3 extend theirs with YaRN, beside no change and position interpolation.

    python -m architectures.deepseek_v3.experiments.long_context --size cpu --out runs/long-context-cpu \\
        --figure notes/figures/long-context-cpu.png                                # 2-core CPU
    python -m architectures.deepseek_v3.experiments.long_context --size gpu --out runs/long-context-gpu   # one GPU

1. Pretrain the `tiny` (cpu) or `shakespeare` (gpu) preset at a context of L = 256 on Tiny
   Shakespeare through the shared loop (`training.trainer.train`), tokenizer and data layer,
   with the family's loss and router-bias update (architectures/deepseek_v3/train.py).
2. Extend to L' = 1024 (factor s = L'/L = 4) three ways, each a NEW model built from a new config
   (max_position_embeddings L', and its rope_scaling) that loads the trained state dict: the
   rotary tables and YaRN's softmax scale are computed from the config, as for any checkpoint.
     none   the default RoPE, unchanged: positions 256..1023 give angles never seen in training
     pi     position interpolation: every frequency / s (rope_type "linear")
     yarn   DeepSeek-V3's YaRN settings (beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1)
            at factor s over L: the NTK-by-parts frequencies and a softmax scale x mscale(s)^2
3. Evaluate each as is and after the same short fine-tune at L' (the same batches for each):
   validation loss per position, in nats per character, over non-overlapping L'-token windows
   of the validation split (the last 10% of Tiny Shakespeare), averaged in buckets of positions.
   The reference is the pretrained model at L, on the first L tokens of the same windows.
   Two more evaluations, as is only, separate YaRN's parts: `ntk` (NTK-aware scaling) and
   `yarn_frequencies_only` (YaRN's frequencies with no temperature change).
Writes to --out: results.json, long_context.png (or --figure), and one folder per training run
with its metrics.jsonl. notes/long-context.md explains the scalings and reads the results.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.utils.files import atomic_write_json
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.common.rope import rope_parameters, softmax_scale
from architectures.deepseek_v3.config import DeepseekV3Config, preset
from architectures.deepseek_v3.model import DeepseekV3
from architectures.deepseek_v3.losses import bias_update_step as on_step, deepseek_lm_loss as LOSS_FN
from training.cli import load_data
from training.recipes import pretraining_recipes
from architectures.utils.device import add_device_option, compute_dtype, device_label, resolve_device
from training.lm import evaluate_split
from training.train_config import TrainConfig
from training.trainer import train

METHODS = ("none", "pi", "yarn")  # each evaluated as is and after fine-tuning at the long context
ABLATIONS = ("ntk", "yarn_frequencies_only")  # evaluated as is only
LABELS = {"none": "no change", "pi": "position interpolation", "yarn": "YaRN (DeepSeek's settings)",
          "ntk": "NTK-aware", "yarn_frequencies_only": "YaRN frequencies, no mscale"}


@dataclass
class Size:
    recipe: str  # the preset and recipe of architectures/deepseek_v3/train.py it starts from
    pretrain: TrainConfig  # training at the short context (its block_size is L)
    finetune: TrainConfig  # the short fine-tune at the long context (its block_size is L')
    bucket: int  # positions per bucket of the figure and the table


RECIPES = pretraining_recipes("deepseek_v3")  # the schedules DeepSeek-V3 pretrains with

SIZES = {
    # 2-core CPU, about 6-7 minutes on an idle machine (estimated from the quiet stretches of two
    # runs on a busy one, which took 24 and 41 minutes: notes/long-context.md). The quick-start
    # recipe's 4,096 tokens per step (16 x 256 instead of 32 x 128) for 300 steps (2.4 epochs of
    # the ~0.52M train tokens), then 24 steps (8%) of 4 x 1024 for each extension.
    "cpu": Size("tiny",
                dataclasses.replace(RECIPES["tiny"].train, max_steps=300, batch_size=16, block_size=256,
                                    warmup_steps=30, eval_interval=100, eval_batches=4, log_interval=25, device="cpu"),
                TrainConfig(max_steps=24, batch_size=4, block_size=1024, lr=5e-4, min_lr=5e-5, warmup_steps=4,
                            eval_interval=24, eval_batches=2, log_interval=8, device="cpu"),
                bucket=64),
    # One GPU with bf16 autocast: the family's `shakespeare` recipe (600 steps of 64 x 256), then 48
    # steps (8%) of 16 x 1024 for each extension: 82 s in all on one H100 (notes/long-context.md).
    "gpu": Size("shakespeare",
                dataclasses.replace(RECIPES["shakespeare"].train, eval_batches=10),
                TrainConfig(max_steps=48, batch_size=16, block_size=1024, lr=2.5e-4, min_lr=2.5e-5, warmup_steps=5,
                            beta2=0.99, eval_interval=48, eval_batches=4, log_interval=8),
                bucket=64),
}


# ---------------------------------------------------------------------------- configs


@dataclass
class ScaledRopeConfig(DeepseekV3Config):
    """DeepSeek-V3's config with a rope_scaling of any type architectures/common/rope.py computes.

    `DeepseekV3Config` accepts YaRN only, the one scaling DeepSeek's checkpoints use; the
    comparison needs position interpolation and NTK-aware scaling on the same model. Here
    rope_scaling carries its 'rope_type' and goes to the rotary tables and the softmax scale
    as it is."""

    def __post_init__(self):
        scaling, self.rope_scaling = self.rope_scaling, None
        super().__post_init__()  # every other field's checks
        if not scaling or "factor" not in scaling or "rope_type" not in scaling:
            raise ValueError(f"ScaledRopeConfig needs a rope_scaling with 'rope_type' and 'factor', got {scaling}")
        rope_parameters(self.qk_rope_head_dim, self.rope_theta, scaling)  # an unknown type fails here
        self.rope_scaling = dict(scaling)

    @property
    def rope_parameters(self) -> dict:
        return dict(self.rope_scaling)


def rope_scaling_for(method: str, factor: float, original: int) -> dict | None:
    """The rope_scaling of each extension, by factor s = L'/L over the original context L."""
    if method == "none":
        return None
    if method == "pi":
        return {"rope_type": "linear", "factor": factor}
    if method == "ntk":
        return {"rope_type": "ntk", "factor": factor}
    # DeepSeek-V3's published YaRN settings, at this experiment's factor and original context.
    yarn = dict(preset("deepseek-v3").rope_scaling, factor=factor, original_max_position_embeddings=original)
    if method == "yarn":
        return dict(yarn, rope_type="yarn")
    if method == "yarn_frequencies_only":
        # No mscale: neither the cos/sin tables nor the softmax scale change temperature.
        freqs = {k: v for k, v in yarn.items() if not k.startswith("mscale")}
        return dict(freqs, rope_type="yarn", attention_factor=1.0)
    raise ValueError(f"unknown extension {method!r}; choose from {METHODS + ABLATIONS}")


def extended_config(cfg: DeepseekV3Config, method: str, context: int) -> DeepseekV3Config:
    """The config of `cfg`'s model extended to `context` tokens by `method`; its trained context is
    cfg.max_position_embeddings. YaRN and no change stay DeepseekV3Configs; PI and NTK need
    `ScaledRopeConfig`."""
    if cfg.rope_scaling is not None:
        raise ValueError("extended_config starts from a model trained with the default RoPE (rope_scaling None)")
    original = cfg.max_position_embeddings
    scaling = rope_scaling_for(method, context / original, original)
    if scaling is None or scaling["rope_type"] == "yarn":
        return dataclasses.replace(cfg, max_position_embeddings=context, rope_scaling=scaling)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DeepseekV3Config)}
    return ScaledRopeConfig(**dict(fields, max_position_embeddings=context, rope_scaling=scaling))


def extend(model: DeepseekV3, method: str, context: int) -> DeepseekV3:
    """A new model of the extended config holding `model`'s trained weights (on the CPU)."""
    new = DeepseekV3(extended_config(model.config, method, context))
    new.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    # The routers' load counters are not in the state dict; the new model starts them at zero.
    return new


# ---------------------------------------------------------------------------- per-position loss


def validation_windows(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """(W, block_size + 1) int64: the non-overlapping windows `training.lm.evaluate_split` reads."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise ValueError(f"split of {len(tokens)} tokens is too short for one window of {block_size + 1}")
    return torch.stack([tokens[i * block_size: i * block_size + block_size + 1] for i in range(n)]).long()


@torch.no_grad()
def position_losses(model, rows: torch.Tensor, batch_size: int = 8, device="cpu",
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(W, T) next-token cross-entropy in nats at every position of every window, rows (W, T + 1)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size].to(device)  # (b, T + 1)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch[:, :-1])  # (b, T, V)
        nats = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # (b, T)
        out.append(nats.cpu())
    model.train(was_training)
    return torch.cat(out)


def token_chars(tokenizer) -> torch.Tensor:
    """(V,) the characters each token id decodes to: a target's share of the text it predicts."""
    return torch.tensor([len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)], dtype=torch.float64)


def nats_per_char(nats: torch.Tensor, chars: torch.Tensor, lo: int = 0, hi: int | None = None) -> float:
    """sum of the losses / sum of the characters of the targets at positions lo..hi-1."""
    return float(nats[:, lo:hi].double().sum() / chars[:, lo:hi].sum())


def bucket_nats_per_char(nats: torch.Tensor, chars: torch.Tensor, bucket: int) -> list[float]:
    """nats/char in each bucket of `bucket` positions: nats, chars (W, T) -> T / bucket values."""
    return [nats_per_char(nats, chars, lo, lo + bucket) for lo in range(0, nats.shape[1], bucket)]


def summarize(nats: torch.Tensor, chars: torch.Tensor, bucket: int, train_context: int) -> dict:
    below, above = nats_per_char(nats, chars, 0, train_context), None
    if nats.shape[1] > train_context:
        above = nats_per_char(nats, chars, train_context)
    return {"buckets_nats_per_char": bucket_nats_per_char(nats, chars, bucket),
            "buckets_nats_per_token": [float(x) for x in nats.double().view(len(nats), -1, bucket).mean((0, 2))],
            "below_train_context": below, "from_train_context": above, "all": nats_per_char(nats, chars)}


# ---------------------------------------------------------------------------- the experiment


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, bucket, ev = results["train_context"], results["bucket"], results["evaluations"]
    ref = ev["reference"]["buckets_nats_per_char"]
    colors = {"none": "tab:red", "pi": "tab:blue", "yarn": "tab:green", "ntk": "tab:purple",
              "yarn_frequencies_only": "tab:olive"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, stage, title in ((axes[0], "as_is", "as is"),
                             (axes[1], "fine_tuned", f"after {results['finetune']['max_steps']} steps at "
                                                     f"{results['context']} tokens")):
        centres = [b * bucket + bucket / 2 for b in range(len(ref))]
        # On top: below L, 'no change' as is computes exactly the reference and would hide it.
        ax.plot(centres, ref, color="black", marker="o", ms=3, lw=2.5, zorder=10,
                label=f"reference: trained model at {L}")
        for m in METHODS + (ABLATIONS if stage == "as_is" else ()):
            key = f"{m}/{stage}"
            if key not in ev:
                continue
            ys = ev[key]["buckets_nats_per_char"]
            xs = [b * bucket + bucket / 2 for b in range(len(ys))]
            ablation = m in ABLATIONS
            ax.plot(xs, ys, color=colors[m], marker="" if ablation else "o", ms=3, lw=1 if ablation else 1.8,
                    ls="--" if ablation else "-", label=LABELS[m] + (" (ablation)" if ablation else ""))
        ax.axvline(L, color="gray", ls=":", lw=1.5)
        ax.text(L, 0.02, f" training context {L}", transform=ax.get_xaxis_transform(), color="gray", fontsize=8)
        ax.set(title=title, xlabel=f"position in the window (buckets of {bucket})", xlim=(0, results["context"]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats / char)")
    finite = [y for k, v in ev.items() for y in v["buckets_nats_per_char"] if not k.startswith("none/as_is")]
    top = max(finite) + 0.1
    worst = max(ev["none/as_is"]["buckets_nats_per_char"]) if "none/as_is" in ev else 0
    if worst > top:  # keep the other curves readable; the clipped values are in results.json
        axes[0].set_ylim(top=top)
        axes[0].text(0.99, 0.97, f"no change rises to {worst:.2f} (clipped)", transform=axes[0].transAxes,
                     ha="right", va="top", color="tab:red", fontsize=8)
    fig.suptitle(f"DeepSeek-V3 '{results['preset']}' trained at {L} tokens, evaluated at {results['context']} "
                 f"({results['device']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune(model: DeepseekV3, cfg: TrainConfig, data, out: Path) -> float:
    """The short fine-tune at the long context through the shared loop; returns its wall time."""
    result = train(model, LOSS_FN, data.batches(cfg.block_size), cfg, out, on_step=on_step,
                   val_units_per_token=1.0 / data.tokens.val_chars_per_token)
    return result.elapsed_s


@command_line
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m architectures.deepseek_v3.experiments.long_context",
                                description="Extend a DeepSeek-V3 from 256 to 1024 tokens of context: none, PI, YaRN.")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu: a 2-core CPU in minutes; gpu: one GPU (the sizes the note reports)")
    p.add_argument("--out", default="runs/long-context", help="folder for the runs, results.json and the figure")
    p.add_argument("--figure", default=None, help="where to save the figure (default: OUT/long_context.png)")
    add_device_option(p, default=None, help="default: cpu for --size cpu, auto for --size gpu")
    p.add_argument("--train-context", type=int, default=256, help="L: the pretraining context")
    p.add_argument("--context", type=int, default=1024, help="L': the extended context (a multiple of --bucket)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="steps at the training context (default: the size's)")
    p.add_argument("--finetune-steps", type=int, default=None, help="steps of each extension's fine-tuning at the long context (default: the size's)")
    p.add_argument("--bucket", type=int, default=None, help="positions per bucket (divides both contexts)")
    p.add_argument("--eval-windows", type=int, default=0, help="evaluate on the first N windows only (0: all)")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    L, L2, bucket = args.train_context, args.context, args.bucket or size.bucket
    if L2 <= L or L % bucket or L2 % bucket:
        raise ValueError(f"--context {L2} must exceed --train-context {L}, and --bucket {bucket} divide both")
    overrides = {"device": args.device} if args.device else {}
    pre_cfg = dataclasses.replace(size.pretrain, block_size=L, **overrides,
                                  **({"max_steps": args.pretrain_steps} if args.pretrain_steps else {}))
    ft_cfg = dataclasses.replace(size.finetune, block_size=L2, **overrides,
                                 **({"max_steps": args.finetune_steps} if args.finetune_steps else {}))
    ft_cfg = dataclasses.replace(ft_cfg, eval_interval=ft_cfg.max_steps, warmup_steps=min(ft_cfg.warmup_steps,
                                                                                          ft_cfg.max_steps))
    if pre_cfg.warmup_steps >= pre_cfg.max_steps:
        pre_cfg = dataclasses.replace(pre_cfg, warmup_steps=0)
    out = Path(args.out)
    device = resolve_device(pre_cfg.device)
    autocast = compute_dtype(pre_cfg.dtype, device)
    autocast = None if autocast == torch.float32 else autocast
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    recipe = RECIPES[size.recipe]
    data = load_data(recipe.data)
    data.check_fits(L2)
    model_cfg = dataclasses.replace(recipe.model, vocab_size=data.tokenizer.vocab_size, max_position_embeddings=L)
    torch.manual_seed(pre_cfg.seed)
    base = DeepseekV3(model_cfg)
    print(f"long_context: pretraining {size.recipe} ({sum(p.numel() for p in base.parameters()):,} parameters) "
          f"at {L} tokens for {pre_cfg.max_steps} steps", flush=True)
    pre = train(base, LOSS_FN, data.batches(L), pre_cfg, out / "pretrain", on_step=on_step,
                val_units_per_token=1.0 / data.tokens.val_chars_per_token)

    t = time.perf_counter()
    pre_val = evaluate_split(base, data.tokens.val, L, device=device) / data.tokens.val_chars_per_token
    print(f"long_context: pretrained model, whole validation split at {L} tokens: {pre_val:.4f} nats/char", flush=True)
    timings = {"pretrain_s": pre.elapsed_s, "eval/whole_split_s": time.perf_counter() - t}

    rows = validation_windows(data.tokens.val, L2)  # (W, L' + 1)
    if args.eval_windows:
        rows = rows[:args.eval_windows]
    chars = token_chars(data.tokenizer)[rows[:, 1:]]  # (W, L'): characters of each target

    evaluations = {}

    def evaluate(name: str, model, windows: torch.Tensor) -> None:
        t = time.perf_counter()
        nats = position_losses(model.to(device), windows, device=device, autocast_dtype=autocast)
        evaluations[name] = summarize(nats, chars[:, :windows.shape[1] - 1], bucket, L)
        timings[f"eval/{name}_s"] = time.perf_counter() - t
        e = evaluations[name]
        above = "" if e["from_train_context"] is None else f" from_{L}={e['from_train_context']:.4f}"
        print(f"long_context eval={name} below_{L}={e['below_train_context']:.4f}{above} nats_per_char", flush=True)

    evaluate("reference", base, rows[:, :L + 1])
    for method in METHODS + ABLATIONS:
        evaluate(f"{method}/as_is", extend(base, method, L2), rows)
    for method in METHODS:
        model = extend(base, method, L2)
        print(f"long_context: fine-tuning '{method}' at {L2} tokens for {ft_cfg.max_steps} steps", flush=True)
        timings[f"finetune/{method}_s"] = finetune(model, ft_cfg, data, out / f"finetune-{method}")
        evaluate(f"{method}/fine_tuned", model, rows)

    wall = time.perf_counter() - t0
    results = {
        "command": "python -m architectures.deepseek_v3.experiments.long_context "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "size": args.size, "preset": size.recipe, "device": device_label(device),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "corpus": data.corpus.name, "tokenizer": f"{data.tokenizer.kind} {data.tokenizer.vocab_size}",
        "train_context": L, "context": L2, "factor": L2 / L, "bucket": bucket, "windows": len(rows),
        "model": dataclasses.asdict(model_cfg), "pretrain": dataclasses.asdict(pre_cfg),
        "finetune": dataclasses.asdict(ft_cfg), "pretrain_val_nats_per_char": pre_val,
        "rope_scaling": {m: rope_scaling_for(m, L2 / L, L) for m in METHODS + ABLATIONS},
        # mscale(s, mscale_all_dim)^2: what YaRN multiplies DeepSeek's 1/sqrt(d_h + d_h^R) by.
        "yarn_softmax_scale_multiplier": softmax_scale(model_cfg.qk_head_dim, extended_config(
            model_cfg, "yarn", L2).rope_parameters) * math.sqrt(model_cfg.qk_head_dim),
        "evaluations": evaluations, "timings_s": timings, "wall_s": wall,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    plot(results, Path(args.figure) if args.figure else out / "long_context.png")
    print(f"long_context: {wall:.0f} s in all on {results['device']}; results in {out / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()

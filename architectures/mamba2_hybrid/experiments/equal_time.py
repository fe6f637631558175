"""Experiment: attention, Mamba-2 and a hybrid at equal parameters AND equal training time on Tiny Shakespeare.

    python -m architectures.mamba2_hybrid.experiments.equal_time --out runs/mamba2-shakespeare              # 2-core CPU
    python -m architectures.mamba2_hybrid.experiments.equal_time --size gpu --out runs/mamba2-shakespeare-gpu

Three models of (nearly) one parameter count, `KINDS`:
  attention  Llama 3: every layer grouped-query attention (RoPE) + SwiGLU
  mamba2     a pure Mamba-2: every layer one Mamba-2 mixer (the pattern "MMM...")
  hybrid     Nemotron-H: Mamba-2, MLP and a few attention layers without position encoding
Each trains for the same wall-time budget on the same device. Run times read minutes apart on
a shared machine are not comparable, so each model's step time is measured first with the
three taking turns on one batch (`interleaved_step_times`, as architectures/mixtral/experiments/dense_vs_moe.py
does), and each model then gets the number of steps that fits the budget at that step time:
steps = budget / step time. Everything else is shared: data, tokenizer, batch, seed (hence
the same batch order: a faster model simply reads further), optimizer, and the schedule's
shape (warm-up over the first 10% of a run's steps, then cosine decay to min_lr at its last).
The figure plots validation nats/char against steps x the interleaved step time (training time
on equal terms), against each run's own clock, and against steps.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

from architectures.utils.files import atomic_write_json, read_jsonl
from architectures.utils.command_line import command_line
from architectures.llama3.config import preset as llama_preset
from architectures.mamba2_hybrid.config import preset as mamba_preset
from architectures.mamba2_hybrid.experiments.common import (build_model, describe, experiment_parser,
                                                            interleaved_step_times, parameter_counts, parameter_spread,
                                                            redraw, save_figure, size_train_config, with_steps)
from architectures.utils.device import compute_dtype, device_label, resolve_device
from training.data import load_corpus, prepare_data, split_text
from architectures.common.loss import lm_loss
from training.lm import evaluate_split
from training.tokenizer import get_tokenizer
from training.train_config import TrainConfig
from training.trainer import train

KINDS = ("attention", "mamba2", "hybrid")


# ---------------------------------------------------------------------------- Tiny Shakespeare

SIZES = {
    # 2-core CPU: the `tiny` presets (D = 128). Llama 3 tiny: 4 x (attention + SwiGLU 384); hybrid: the
    # Mamba-2 tiny preset "M-M*M-M-" (4 Mamba-2, 1 attention, 3 MLP); Mamba-2: 7 of its Mamba-2 layers.
    # chunk_size 16 instead of the preset's 64: the same function (ssd.py), faster on a CPU at T = 128.
    "cpu": dict(preset="tiny", bpe_vocab_size=512, mamba_layers=7, llama_ffn=384, chunk_size=16, budget_s=75.0, evals=6,
                train=TrainConfig(batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4, eval_batches=4,
                                  log_interval=10, device="cpu")),
    # One GPU, bf16 autocast: the `shakespeare` presets (D = 384): hybrid "M-M*M-M-M*M-" (6 Mamba-2,
    # 2 attention, 4 MLP); Mamba-2: 10 of its Mamba-2 layers; Llama 3: 6 layers, SwiGLU widened from
    # 1024 to 1088 to meet the others' count. No dropout in any (see `model_configs`).
    "gpu": dict(preset="shakespeare", bpe_vocab_size=2048, mamba_layers=10, llama_ffn=1088, chunk_size=64, budget_s=60.0,
                evals=20,
                train=TrainConfig(batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4, beta2=0.99, eval_batches=20,
                                  log_interval=20)),
}


def model_configs(size: str, vocab_size: int) -> dict:
    """{kind: config} from the size's presets, at (nearly) one parameter count (`PARAMETER_TOLERANCE` of common.py,
    tests/architectures/mamba2_hybrid/test_experiment.py). Dropout is 0 in all three: Mamba-2 layers
    have none in this implementation, so the presets' attention dropout would regularise only the
    models with attention. At the gpu size a run may go over the corpus many times (Llama 3's
    `shakespeare` recipe stops at 600 steps of 64 x 256 tokens because it overfits after that,
    architectures/llama3/train.py), so results.json reports each run at its best evaluation
    (`BestWeights`) beside its end."""
    s = SIZES[size]
    attention = dataclasses.replace(llama_preset(s["preset"]), vocab_size=vocab_size, intermediate_size=s["llama_ffn"],
                                    dropout=0.0)
    hybrid = dataclasses.replace(mamba_preset(s["preset"]), vocab_size=vocab_size, chunk_size=s["chunk_size"], dropout=0.0)
    L = s["mamba_layers"]
    return {"attention": attention,
            "mamba2": dataclasses.replace(hybrid, num_hidden_layers=L, hybrid_override_pattern="M" * L),
            "hybrid": hybrid}


class BestWeights:
    """The `on_log` hook that keeps a CPU copy of the weights at the best validation estimate so far:
    a run that overfits is then also measured where it stood best (early stopping, after the fact)."""

    def __init__(self, model: nn.Module):
        self.model, self.step, self.nats, self.state = model, None, float("inf"), None

    def see(self, entry: dict) -> None:
        if entry.get("val_nats_per_char", float("inf")) < self.nats:
            self.step, self.nats = entry["step"], entry["val_nats_per_char"]
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_budget, by_clock, by_step) = plt.subplots(1, 3, figsize=(18, 4.6), sharey=True)
    for kind, r in results["models"].items():
        val = [e for e in read_jsonl(out / kind / "metrics.jsonl") if "val_nats_per_char" in e]
        nats = [e["val_nats_per_char"] for e in val]
        label = f"{kind} ({r['parameters']:,} params, {r['steps']} steps of {r['step_s_interleaved'] * 1e3:.0f} ms)"
        by_budget.plot([e["step"] * r["step_s_interleaved"] for e in val], nats, marker=".", label=label)
        by_clock.plot([e["train_s"] for e in val], nats, marker=".", label=kind)
        by_step.plot([e["step"] for e in val], nats, marker=".", label=kind)
    by_budget.set(xlabel="steps x step time measured taking turns (s)", ylabel="validation nats / char",
                  title="against training time, on equal terms")
    by_clock.set(xlabel="the run's own clock: training steps, evaluation excluded (s)", title="against wall time, as it ran")
    by_step.set(xlabel="optimizer step (each run's schedule ends at its own last step)", title="against steps")
    for ax in (by_budget, by_clock, by_step):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Tiny Shakespeare, {results['budget_s']:.0f} s of training per model: {results['device']}")
    fig.tight_layout()
    path = out / "val_loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@command_line
def main(argv=None) -> dict:
    p = experiment_parser("python -m architectures.mamba2_hybrid.experiments.equal_time", "runs/mamba2-shakespeare", SIZES,
                          "notes/figures/mamba2-shakespeare-cpu.png")
    p.add_argument("--budget-s", type=float, default=None, help="training seconds per model (default: the size's)")
    p.add_argument("--dataset", default="tinyshakespeare", help="the corpus (tests pass a small .txt)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: the size's)")
    args = p.parse_args(argv)
    if args.plot_only:
        return redraw(args, plot)
    t0 = time.perf_counter()
    s = SIZES[args.size]
    train_cfg = size_train_config(s["train"], args, ("device", "batch_size", "block_size"))
    budget = args.budget_s if args.budget_s is not None else s["budget_s"]
    device = resolve_device(train_cfg.device)
    dtype = compute_dtype(train_cfg.dtype, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    text = load_corpus(args.dataset)
    tokenizer = get_tokenizer(split_text(text)[0], "bpe", s["bpe_vocab_size"])
    data = prepare_data(args.dataset, tokenizer, text=text)
    configs = model_configs(args.size, data.vocab_size)

    def sample_batch(split: str, n: int, generator: torch.Generator):
        return data.get_batch(split, n, train_cfg.block_size, generator)

    def fresh(kind: str) -> nn.Module:
        torch.manual_seed(train_cfg.seed)  # each model's initialisation depends on the seed only
        return build_model(configs[kind])

    batch = sample_batch("train", train_cfg.batch_size, torch.Generator().manual_seed(0))
    step_s = interleaved_step_times({k: fresh(k) for k in KINDS}, lm_loss, batch, device, dtype)
    results = {"command": "python -m architectures.mamba2_hybrid.experiments.equal_time "
                          + " ".join(sys.argv[1:] if argv is None else argv),
               "size": args.size, "device": device_label(device), "dtype": str(dtype).replace("torch.", ""),
               "dataset": args.dataset, "bpe_vocab_size": data.vocab_size, "budget_s": budget,
               "train": dataclasses.asdict(train_cfg), "models": {}}
    for kind in KINDS:
        steps = max(1, int(budget / step_s[kind]))
        run_cfg = with_steps(train_cfg, steps, s["evals"])
        model = fresh(kind)
        counts = parameter_counts(model)
        print(f"---- {kind}: {counts['parameters']:,} parameters, {step_s[kind] * 1e3:.0f} ms per step (taking "
              f"turns) -> {steps} steps in {budget:.0f} s; {describe(configs[kind])}", flush=True)
        best = BestWeights(model)
        result = train(model, lm_loss, sample_batch, run_cfg, out / kind,
                       val_units_per_token=1.0 / data.val_chars_per_token, on_log=best.see)
        val = evaluate_split(model, data.val, train_cfg.block_size, device=device) / data.val_chars_per_token
        evals = [e for e in read_jsonl(out / kind / "metrics.jsonl") if "val_nats_per_char" in e]
        at_best = next(e for e in evals if e["step"] == best.step)
        if best.step != steps:  # an earlier evaluation was better: measure those weights on the whole split too
            model.load_state_dict(best.state)
            at_best["whole_split"] = evaluate_split(model, data.val, train_cfg.block_size,
                                                    device=device) / data.val_chars_per_token
        else:
            at_best["whole_split"] = val
        results["models"][kind] = {**counts, "config": describe(configs[kind]), "steps": steps,
                                   "step_s_interleaved": step_s[kind], "train_s": evals[-1]["train_s"],
                                   "elapsed_s": result.elapsed_s, "val_nats_per_char": val,
                                   "best": {"step": best.step, "train_s": at_best["train_s"],
                                            "val_estimate": at_best["val_nats_per_char"],
                                            "val_nats_per_char": at_best["whole_split"]}}
    results["parameter_spread"] = parameter_spread({k: r["parameters"] for k, r in results["models"].items()})
    results["wall_s"] = time.perf_counter() - t0
    save_figure(plot(results, out), args.figure)
    atomic_write_json(out / "results.json", results)
    for kind, r in results["models"].items():
        print(f"shakespeare model={kind} params={r['parameters']} steps={r['steps']} "
              f"step_ms_interleaved={r['step_s_interleaved'] * 1e3:.1f} train_s={r['train_s']:.1f} "
              f"val_nats_per_char={r['val_nats_per_char']:.4f} best_step={r['best']['step']} "
              f"best_val_nats_per_char={r['best']['val_nats_per_char']:.4f}", flush=True)
    print(f"parameter counts differ by {results['parameter_spread']:.1%} of the largest; wall time "
          f"{results['wall_s']:.0f} s on {results['device']}", flush=True)
    return results


if __name__ == "__main__":
    main()

"""Experiment: how evenly DeepSeekMoE loads its experts with the auxiliary-loss-free bias update,
with the sequence-wise balance loss alone, and with neither, on Tiny Shakespeare.

    python -m architectures.deepseek_v3.experiments.expert_load --out runs/deepseek-expert-load --figure     # 2-core CPU
    python -m architectures.deepseek_v3.experiments.expert_load --size gpu --out DIR --figure                # one GPU

Paper: "DeepSeek-V3 Technical Report" (2024, arXiv:2412.19437, section 2.1.2); the bias rule is
from "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (2024, arXiv:2408.15664).
Three runs through the shared loop (`training.trainer.train`), same data, batches, schedule and seed:
  bias           b_i += gamma * sign(mean load - load_i) after every step (`update_routing_bias`),
                 no balance loss (seq_aux_loss_alpha = 0)
  balance_loss   alpha * sum over MoE layers of `sequence_balance_loss` (section 2.1.2's
                 complementary loss), the bias left at 0
  neither        cross-entropy only
In every run the loads are counted from zero at each step (the bias update resets them, and the
other two runs' `on_step` resets them without updating), so `moe/l{i}/max_load` (busiest expert's
tokens over the mean, 1 = balanced) is one step's, averaged over each logging window by the loop.

alpha: DeepSeek-V3 used 0.0001 beside the bias, as a backstop against imbalance within one
sequence. Alone, over a few hundred steps, that is too weak to move a router: in a 60-step trial
of the cpu size it left the MoE layers' busiest experts at 1.9-2.3x the mean load, as without any
balancing (1.7-2.4x), where 0.01 gave 1.1-1.3x. We use 0.01, the weight Switch Transformer and
our Mixtral presets give their balance loss.
gamma: the preset's (DeepSeek-V3's) 0.001 moves a bias by at most 0.001 per step, slow beside
routers that lose their balance within 20 steps; both sizes use 0.01 (see SIZES).

Writes to --out: one folder per run (metrics.jsonl, summary.json), results.json and
expert_load.png (max/mean load of every MoE layer against steps for each run, and validation
nats/char against steps with the final whole-split figure in the legend); --figure also copies
the figure to notes/figures/deepseek-expert-load-<hardware>.png. A run whose folder already
holds a summary is not run again, so the runs can be split over several calls.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from architectures.utils.files import atomic_write_json, read_jsonl
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.deepseek_v3.config import preset
from architectures.deepseek_v3.model import DeepseekV3
from architectures.deepseek_v3.moe import Router, update_routing_bias
from architectures.deepseek_v3.losses import deepseek_lm_loss
from training.data import load_corpus, prepare_data, split_text
from architectures.utils.device import add_device_option, resolve_device
from training.lm import evaluate_split
from training.tokenizer import get_tokenizer
from training.train_config import TrainConfig
from training.trainer import train

RUNS = ("bias", "balance_loss", "neither")
REPO = Path(__file__).resolve().parents[2]
SIZES = {
    # 2-core CPU: the `tiny` preset (4 x 128; 3 MoE layers of 8 routed experts of 64 in 2 groups, top-2
    # from the best group, + 1 shared), 200 steps of 16 x 128 tokens (under one epoch of the BPE-512 text).
    # gamma = 0.01: the bias moves by gamma per step, and the routers collapse within the first 20
    # steps; with the preset's 0.001, a 60-step trial left the last layer's busiest expert at 2.5x the
    # mean load (1.3x with 0.01).
    "cpu": dict(preset="tiny", bpe_vocab_size=512, alpha=0.01, gamma=0.01,
                train=TrainConfig(max_steps=200, batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                                  eval_interval=50, eval_batches=8, log_interval=10, device="cpu")),
    # One GPU, bf16 autocast: the `shakespeare` preset (6 x 384; 5 MoE layers of 16 routed experts of 128 in
    # 4 groups, top-4 from the best 2, + 1 shared), 500 steps of 64 x 256 tokens (several epochs: the
    # validation figure overfits, the loads are what this size is for).
    "gpu": dict(preset="shakespeare", bpe_vocab_size=1024, alpha=0.01, gamma=0.01,
                train=TrainConfig(max_steps=500, batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4,
                                  warmup_steps=50, beta2=0.99, eval_interval=50, eval_batches=20, log_interval=10)),
}


def make_model(run: str, size: dict, vocab_size: int) -> DeepseekV3:
    cfg = dataclasses.replace(preset(size["preset"]), vocab_size=vocab_size, routing_bias_update_speed=size["gamma"],
                              seq_aux_loss_alpha=size["alpha"] if run == "balance_loss" else 0.0)
    return DeepseekV3(cfg)


def reset_loads(step: int, model) -> None:
    """`on_step` of the runs without the bias update: count the next step's loads from zero."""
    for module in model.modules():
        if isinstance(module, Router):
            module.load.zero_()


def on_step_for(run: str):
    return (lambda step, model: update_routing_bias(model)) if run == "bias" else reset_loads


def device_tag(device: torch.device) -> str:
    """'cpu', or the GPU's model from its name ('NVIDIA H100 80GB HBM3' -> 'h100'), for file names."""
    if device.type != "cuda":
        return "cpu"
    found = re.search(r"\b[A-Z]\d{2,4}\b", torch.cuda.get_device_name(device))
    return found[0].lower() if found else "gpu"


def run_one(run: str, size: dict, train_cfg: TrainConfig, data, out: Path) -> dict:
    summary_file = out / "summary.json"
    if summary_file.is_file():
        print(f"{run}: already done in {out}, reusing it", flush=True)
        return json.loads(summary_file.read_text())
    torch.manual_seed(train_cfg.seed)
    model = make_model(run, size, data.vocab_size)
    print(f"{run}: {sum(p.numel() for p in model.parameters()):,} parameters, seq_aux_loss_alpha="
          f"{model.config.seq_aux_loss_alpha}, bias update {'on (gamma=' + str(size['gamma']) + ')' if run == 'bias' else 'off'}",
          flush=True)
    result = train(model, deepseek_lm_loss, lambda split, n, g: data.get_batch(split, n, train_cfg.block_size, g),
                   train_cfg, out, val_units_per_token=1.0 / data.val_chars_per_token, on_step=on_step_for(run))
    device = resolve_device(train_cfg.device)
    val = evaluate_split(model, data.val, train_cfg.block_size, device=device)
    summary = {"run": run, "seq_aux_loss_alpha": model.config.seq_aux_loss_alpha,
               "bias_update_gamma": size["gamma"] if run == "bias" else 0.0, "train_s": result.elapsed_s,
               "val_nats_per_char": val / data.val_chars_per_token,
               "final_bias_range": [[round(float(layer.mlp.gate.e_score_correction_bias.min()), 4),
                                     round(float(layer.mlp.gate.e_score_correction_bias.max()), 4)]
                                    for layer in model.model.layers if isinstance(getattr(layer.mlp, "gate", None), Router)],
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu ({torch.get_num_threads()} threads)"}
    atomic_write_json(summary_file, summary)
    return summary


def load_series(entries: list[dict]) -> dict[int, tuple[list[int], list[float]]]:
    """{MoE layer: (steps, max/mean load of each logging window)} from `moe/l{i}/max_load`."""
    series: dict[int, tuple[list[int], list[float]]] = {}
    for e in entries:
        for key, value in e.items():
            m = re.fullmatch(r"moe/l(\d+)/max_load", key)
            if m:
                steps, values = series.setdefault(int(m[1]), ([], []))
                steps.append(e["step"])
                values.append(value)
    return dict(sorted(series.items()))


def plot(runs: list[str], results: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {r: read_jsonl(out / r / "metrics.jsonl") for r in runs}
    layers = list(load_series(metrics[runs[0]]))
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.6 * (len(layers) + 1), 3.4))
    colors = dict(zip(RUNS, ("tab:blue", "tab:orange", "tab:gray")))
    for r in runs:
        series = load_series(metrics[r])
        for ax, layer in zip(axes, layers):
            steps, values = series[layer]
            ax.plot(steps, values, color=colors[r], label=r)
        val = [e for e in metrics[r] if "val_nats_per_char" in e]
        axes[-1].plot([e["step"] for e in val], [e["val_nats_per_char"] for e in val], marker=".", color=colors[r],
                      label=f"{r}: {results['runs'][r]['val_nats_per_char']:.4f} (whole split, end)")
    for ax, layer in zip(axes, layers):
        ax.set(title=f"layer {layer}", xlabel="optimizer step", ylim=(1, None))
        ax.axhline(1.0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("busiest expert's load / mean load")
    axes[0].legend()
    axes[-1].set(title="validation", xlabel="optimizer step", ylabel="nats / char (loop's estimate)")
    axes[-1].grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / "expert_load.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@command_line
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m architectures.deepseek_v3.experiments.expert_load")
    p.add_argument("--out", default="runs/deepseek-expert-load", help="folder for the runs, results.json and the figure")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu: a 2-core CPU in minutes; gpu: one GPU (the sizes the note reports)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    add_device_option(p, default=None, help="default: cpu for --size cpu, auto for --size gpu")
    p.add_argument("--max-steps", type=int, default=None, help="default: the size's")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (and per evaluation batch); "
                                                                 "default: the size's")
    p.add_argument("--dataset", default="tinyshakespeare", help="the corpus (a .txt file for quick checks)")
    p.add_argument("--figure", action="store_true",
                   help="also save the figure as notes/figures/deepseek-expert-load-<hardware>.png")
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    if set(runs) - set(RUNS):
        raise SystemExit(f"error: unknown run(s) {sorted(set(runs) - set(RUNS))}; choose from {RUNS}")
    for flag, value in (("--max-steps", args.max_steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be >= 1, got {value}")
    size = SIZES[args.size]
    train_cfg = dataclasses.replace(size["train"], **{k: v for k, v in (
        ("device", args.device), ("max_steps", args.max_steps), ("batch_size", args.batch_size)) if v})
    out = Path(args.out)
    t0 = time.perf_counter()
    text = load_corpus(args.dataset)
    tokenizer = get_tokenizer(split_text(text)[0], "bpe", size["bpe_vocab_size"])
    data = prepare_data(args.dataset, tokenizer, text=text)
    for r in runs:
        run_one(r, size, train_cfg, data, out / r)
    done = [r for r in RUNS if (out / r / "summary.json").is_file()]
    results = {"command": "python -m architectures.deepseek_v3.experiments.expert_load " +
                          " ".join(sys.argv[1:] if argv is None else argv),
               "size": args.size, "preset": size["preset"], "alpha": size["alpha"], "gamma": size["gamma"],
               "train": dataclasses.asdict(train_cfg), "wall_s": time.perf_counter() - t0, "runs": {}}
    for r in done:
        summary = json.loads((out / r / "summary.json").read_text())
        series = load_series(read_jsonl(out / r / "metrics.jsonl"))
        quarter = max(1, len(next(iter(series.values()))[0]) // 4)
        summary["max_load"] = {f"layer{layer}": {"steps": steps, "values": [round(v, 4) for v in values],
                                                 "final": round(values[-1], 4),
                                                 "mean_last_quarter": round(sum(values[-quarter:]) / quarter, 4)}
                               for layer, (steps, values) in series.items()}
        results["runs"][r] = summary
    device = resolve_device(train_cfg.device)
    title = (f"DeepSeekMoE expert load, `{size['preset']}` preset, {train_cfg.max_steps} steps of "
             f"{train_cfg.batch_size} x {train_cfg.block_size} tokens, {device_tag(device)}; alpha={size['alpha']}, "
             f"gamma={size['gamma']}")
    figure = plot(done, results, out, title)
    if args.figure:
        dest = REPO / "notes" / "figures" / f"deepseek-expert-load-{device_tag(device)}.png"
        shutil.copyfile(figure, dest)
        results["figure"] = str(dest.relative_to(REPO))
    atomic_write_json(out / "results.json", results)
    for r, s in results["runs"].items():
        loads = ", ".join(f"{v['final']:.2f}" for v in s["max_load"].values())
        print(f"experiment run={r} alpha={s['seq_aux_loss_alpha']} gamma={s['bias_update_gamma']} "
              f"val_nats_per_char={s['val_nats_per_char']:.4f} train_s={s['train_s']:.0f} "
              f"final_max_over_mean_load=[{loads}]", flush=True)
    return results


if __name__ == "__main__":
    main()

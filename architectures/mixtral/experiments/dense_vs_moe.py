"""Experiment: dense Llama 3 vs sparse MoE at matched active parameters on Tiny Shakespeare,
and the expert utilisation with and without the load-balancing loss.

    python -m architectures.mixtral.experiments.dense_vs_moe --out runs/mixtral-experiment        # 2-core CPU, about 5 minutes
    python -m architectures.mixtral.experiments.dense_vs_moe --size gpu --runs dense --out DIR    # one GPU, a run or two per call

Four runs through the shared loop (`training.trainer.train`), same data, batches, schedule and seed:
  dense                Llama 3 with a SwiGLU of width d_ff                          (loss: lm_loss)
  moe_balanced         Mixtral, E=8 experts of width d_ff/2, top-2, alpha=0.01,
                       balance loss per layer (the presets' setting)               (loss: moe_lm_loss)
  moe_balanced_pooled  the same with transformers' all-layers-pooled balance loss
  moe_no_balance       the same with alpha=0 (the z-loss stays in all three)
A token of the MoE touches the same feed-forward weights as the dense model's (2 x d_ff/2), plus
the D x E router: matched active parameters, 4x the feed-forward parameters in total.
Writes to --out: one folder per run (metrics.jsonl, ...), val_loss.png (validation nats/char
against steps, against each run's wall time, and against steps x a step time measured with the
runs taking turns, which a busy shared machine cannot bias), utilisation.png (each layer's
expert load over training, for each MoE run) and results.json. A run whose folder already
holds a finished summary is not run again, so GPU runs can be split over several calls;
step_times.json keeps the step times, so a call that trains nothing re-plots without timing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

from architectures.utils.files import atomic_write_json, read_jsonl
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.llama3 import Llama3
from architectures.llama3 import preset as llama_preset
from architectures.mixtral.config import preset as mixtral_preset
from architectures.mixtral.flops import active_parameters
from architectures.mixtral.losses import moe_lm_loss
from architectures.mixtral.model import Mixtral
from training.data import load_corpus, prepare_data, split_text
from architectures.common.loss import lm_loss
from training.lm import evaluate_split
from training.tokenizer import get_tokenizer
from architectures.utils.device import add_device_option, resolve_device
from architectures.utils.timing import interleaved_step_times as step_times_in_turns
from training.train_config import TrainConfig
from training.trainer import train

RUNS = ("dense", "moe_balanced", "moe_balanced_pooled", "moe_no_balance")
SIZES = {
    # 2-core CPU: Llama 3 `tiny` (4 x 128, d_ff 384) vs Mixtral `tiny` (8 experts x 192, top-2).
    "cpu": dict(preset="tiny", bpe_vocab_size=512,
                train=TrainConfig(max_steps=250, batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=25,
                                  eval_interval=50, eval_batches=8, log_interval=10, device="cpu")),
    # One GPU: the `shakespeare` presets (6 x 384, d_ff 1024 vs 8 experts x 512, top-2), bf16 autocast.
    "gpu": dict(preset="shakespeare", bpe_vocab_size=1024,
                train=TrainConfig(max_steps=1500, batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4,
                                  warmup_steps=100, beta2=0.99, eval_interval=100, eval_batches=20, log_interval=20)),
}


def make_model(run: str, size: str, vocab_size: int) -> tuple[torch.nn.Module, object]:
    name = SIZES[size]["preset"]
    if run == "dense":
        cfg = dataclasses.replace(llama_preset(name), vocab_size=vocab_size)
        return Llama3(cfg), lm_loss
    cfg = dataclasses.replace(mixtral_preset(name), vocab_size=vocab_size)
    if run == "moe_balanced_pooled":
        cfg = dataclasses.replace(cfg, router_aux_loss_per_layer=False)
    if run == "moe_no_balance":
        cfg = dataclasses.replace(cfg, router_aux_loss_coef=0.0)
    return Mixtral(cfg), moe_lm_loss


def run_one(run: str, size: str, train_cfg: TrainConfig, data, out: Path) -> dict:
    summary_file = out / "summary.json"
    if summary_file.is_file():
        print(f"{run}: already done in {out}, reusing it", flush=True)
        return json.loads(summary_file.read_text())
    torch.manual_seed(train_cfg.seed)
    model, loss_fn = make_model(run, size, data.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_active = active_parameters(model.config) if isinstance(model, Mixtral) else n_params
    print(f"{run}: {n_params:,} parameters, {n_active:,} active per token", flush=True)
    result = train(model, loss_fn, lambda split, n, g: data.get_batch(split, n, train_cfg.block_size, g),
                   train_cfg, out, val_units_per_token=1.0 / data.val_chars_per_token)
    device = resolve_device(train_cfg.device)
    val = evaluate_split(model, data.val, train_cfg.block_size, device=device)
    summary = {"run": run, "parameters": n_params, "active_parameters": n_active, "train_s": result.elapsed_s,
               "val_nats_per_char": val / data.val_chars_per_token,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu ({torch.get_num_threads()} threads)"}
    atomic_write_json(summary_file, summary)
    return summary


def interleaved_step_times(runs: list[str], size: str, train_cfg: TrainConfig, data, rounds: int = 5) -> dict:
    """Median seconds of one training step of each run's model, the runs taking turns on one batch
    (`architectures.utils.timing.interleaved_step_times`)."""
    device = resolve_device(train_cfg.device)
    autocast = torch.bfloat16 if (train_cfg.dtype == "bf16" or (train_cfg.dtype == "auto" and device.type == "cuda")) else None
    batch = data.get_batch("train", train_cfg.batch_size, train_cfg.block_size, torch.Generator().manual_seed(0))
    setups = {}
    for r in runs:
        torch.manual_seed(0)
        setups[r] = make_model(r, size, data.vocab_size)  # (model, loss_fn)
    return step_times_in_turns(setups, batch, device, autocast, rounds)


def routing_shape(entry: dict) -> tuple[int, int]:
    """(layers, experts) from the `moe/l{l}/load_e{e}` keys that moe_lm_loss logs."""
    keys = [re.fullmatch(r"moe/l(\d+)/load_e(\d+)", k) for k in entry]
    return 1 + max(int(m[1]) for m in keys if m), 1 + max(int(m[2]) for m in keys if m)


def load_series(entries: list[dict], layer: int, experts: int) -> tuple[list[int], list[list[float]]]:
    rows = [e for e in entries if f"moe/l{layer}/load_e0" in e]
    return [e["step"] for e in rows], [[e[f"moe/l{layer}/load_e{i}"] for e in rows] for i in range(experts)]


def plot(out: Path, runs: list[str], step_s: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {r: read_jsonl(out / r / "metrics.jsonl") for r in runs}
    fig, (by_step, by_time, by_cost) = plt.subplots(1, 3, figsize=(16, 4))
    for r, entries in metrics.items():
        val = [e for e in entries if "val_nats_per_char" in e]
        nats = [e["val_nats_per_char"] for e in val]
        by_step.plot([e["step"] for e in val], nats, marker=".", label=r)
        by_time.plot([e["elapsed_s"] for e in val], nats, marker=".", label=r)
        by_cost.plot([e["step"] * step_s[r] for e in val], nats, marker=".", label=f"{r} ({step_s[r] * 1e3:.0f} ms/step)")
    by_step.set(xlabel="optimizer step", ylabel="validation nats / char", title="against steps")
    by_time.set(xlabel="wall time of the run (s, evaluation included)", title="against wall time, as it ran")
    by_cost.set(xlabel="steps x median step time, measured interleaved (s)", title="against training time, interleaved")
    for ax in (by_step, by_time, by_cost):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)
    plt.close(fig)

    moe_runs = [r for r in runs if r != "dense"]
    if not moe_runs:
        return
    layers, experts = routing_shape(metrics[moe_runs[0]][0])
    fig, axes = plt.subplots(len(moe_runs), layers, figsize=(3.2 * layers, 2.8 * len(moe_runs)), squeeze=False,
                             sharey=True)
    for row, r in enumerate(moe_runs):
        for layer in range(layers):
            steps, loads = load_series(metrics[r], layer, experts)
            ax = axes[row][layer]
            ax.stackplot(steps, loads, labels=[f"expert {i}" for i in range(experts)])
            ax.set(title=f"{r}: layer {layer}", xlabel="step", ylim=(0, 1))
            if layer == 0:
                ax.set_ylabel("share of token-expert assignments")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "utilisation.png", dpi=120)
    plt.close(fig)


def final_routing(entries: list[dict]) -> dict:
    last = [e for e in entries if "moe/l0/load_e0" in e][-1]
    layers, experts = map(range, routing_shape(last))
    return {f"layer{l}": {"load": [round(last[f"moe/l{l}/load_e{e}"], 4) for e in experts],
                          "max_load_times_E": round(max(last[f"moe/l{l}/load_e{e}"] for e in experts) * len(experts), 3),
                          "load_entropy_nats": round(last[f"moe/l{l}/load_entropy"], 4)} for l in layers}


@command_line
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m architectures.mixtral.experiments.dense_vs_moe")
    p.add_argument("--out", default="runs/mixtral-experiment", help="folder for the runs, results.json and the figures")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu: a 2-core CPU in minutes; gpu: one GPU (the sizes the note reports)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    add_device_option(p, default=None, help="default: cpu for --size cpu, auto for --size gpu")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps of every run (default: the size's)")
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    if set(runs) - set(RUNS):
        raise SystemExit(f"error: unknown run(s) {sorted(set(runs) - set(RUNS))}; choose from {RUNS}")
    size = SIZES[args.size]
    train_cfg = dataclasses.replace(size["train"], **{k: v for k, v in (("device", args.device),
                                                                          ("max_steps", args.max_steps)) if v})
    out = Path(args.out)
    t0 = time.perf_counter()
    text = load_corpus("tinyshakespeare")
    tokenizer = get_tokenizer(split_text(text)[0], "bpe", size["bpe_vocab_size"])
    data = prepare_data("tinyshakespeare", tokenizer, text=text)
    trained = [r for r in runs if not (out / r / "summary.json").is_file()]
    for r in runs:
        run_one(r, args.size, train_cfg, data, out / r)
    done = [r for r in RUNS if (out / r / "summary.json").is_file()]
    # Step times are measured again (all finished runs taking turns) whenever this call trained
    # something, and otherwise read back, so re-plotting elsewhere keeps the machine's figures.
    timing_file = out / "step_times.json"
    step_s = json.loads(timing_file.read_text()) if timing_file.is_file() and not trained else {}
    if set(done) - set(step_s):
        step_s = interleaved_step_times(done, args.size, train_cfg, data)
        atomic_write_json(timing_file, step_s)
    plot(out, done, step_s)
    results = {"command": "python -m architectures.mixtral.experiments.dense_vs_moe " + " ".join(sys.argv[1:] if argv is None else argv),
               "size": args.size, "train": dataclasses.asdict(train_cfg), "wall_s": time.perf_counter() - t0,
               "runs": {r: json.loads((out / r / "summary.json").read_text()) for r in done}}
    for r in done:
        results["runs"][r]["step_s_interleaved"] = step_s[r]
        if r != "dense":
            results["runs"][r]["final_routing"] = final_routing(read_jsonl(out / r / "metrics.jsonl"))
    atomic_write_json(out / "results.json", results)
    for r, s in results["runs"].items():
        extra = ""
        if "final_routing" in s:
            worst = max(v["max_load_times_E"] for v in s["final_routing"].values())
            extra = f" busiest expert {worst:.2f}x its fair share"
        print(f"experiment run={r} params={s['parameters']} active={s['active_parameters']} "
              f"val_nats_per_char={s['val_nats_per_char']:.4f} train_s={s['train_s']:.0f} "
              f"step_ms_interleaved={s['step_s_interleaved'] * 1e3:.0f}{extra}", flush=True)
    return results


if __name__ == "__main__":
    main()

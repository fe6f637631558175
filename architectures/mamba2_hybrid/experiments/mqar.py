"""Experiment: multi-query associative recall (MQAR) for attention, Mamba-2 and a hybrid at equal parameters.

    python -m architectures.mamba2_hybrid.experiments.mqar --out runs/mamba2-mqar                   # 2-core CPU
    python -m architectures.mamba2_hybrid.experiments.mqar --size gpu --out runs/mamba2-mqar-gpu    # one GPU, ~3 minutes

Task: "Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al., 2023,
arXiv:2312.04927). A sequence lists N key-value pairs, then asks for some of the keys again; after
each queried key the model must output that key's value:

    k1 v1 k2 v2 ... kN vN  q1 a1 q2 a2 ... qQ aQ  0 0 ... 0      q_j is one of the k_i, a_j its v_i

Keys and values come from disjoint token ranges (`token_ranges`) and are distinct within a
sequence (as in Zoology); loss and accuracy count the answer positions only (input q_j, target
a_j; every other target is -100). Every key is queried once, in random order, when the T tokens
have room (4N <= T), else as many as fit. An attention layer can look the key up in its cache, which grows
with the sequence; a Mamba-2 layer must have written all N pairs into its fixed state (H x P x N
numbers) before the queries come, so at a fixed width its recall should fall as N grows, as
Zoology measured for the recurrent and gated-convolution models of 2023.

Three models of (nearly) one parameter count (`model_configs`): Llama 3 (attention + SwiGLU per
layer, RoPE), a pure Mamba-2 (pattern "MMMM") and a Nemotron-H-style hybrid ("MM*M": one
attention layer without position encoding). Each trains through the shared loop
(`training.trainer.train`: AdamW, warm-up + cosine, bf16 autocast on a GPU) on the same batches,
which mix the size's N values (each sequence draws its own N, as Zoology trains on a mixture),
with `mqar_loss` (cross-entropy at the answers, and their accuracy), then is tested on one fixed
set of sequences per N (`recall_accuracy`). When `budget_s` is set, the three models' step times
are measured first (taking turns) and the step count, equal for all three, is cut to fit it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.utils.files import atomic_write_json
from architectures.utils.command_line import command_line
from architectures.llama3.config import preset as llama_preset
from architectures.mamba2_hybrid.config import preset as mamba_preset
from architectures.mamba2_hybrid.experiments.common import (build_model, describe, experiment_parser,
                                                            interleaved_step_times, parameter_counts, parameter_spread,
                                                            redraw, save_figure, size_train_config, with_steps)
from architectures.utils.device import compute_dtype, device_label, resolve_device
from architectures.common.loss import IGNORE_INDEX
from training.batches import batch_generator
from training.train_config import TrainConfig
from training.trainer import train

PAD = 0  # the token after the last query; never a target

SIZES = {
    # 2-core CPU: D = 64, T = 64, N up to 16 (4N = T: the largest N still has every key queried).
    # A few hundred steps only, which is early in MQAR training (Zoology trains for tens of thousands).
    "cpu": dict(width=64, seq_len=64, vocab_size=64, pairs=(2, 4, 8, 16), state_size=16, chunk_size=16,
                llama_ffn=224, test_rows=256, budget_s=None,
                train=TrainConfig(max_steps=500, batch_size=32, block_size=64, lr=3e-3, min_lr=3e-4,
                                  warmup_steps=50, weight_decay=0.1, eval_interval=100, eval_batches=4,
                                  log_interval=25, device="cpu")),
    # One GPU, bf16 autocast: D = 128, T = 256, N up to 64. Small models leave an H100 idle between
    # kernel launches, so a large batch costs little time; the step count is cut to fit budget_s.
    "gpu": dict(width=128, seq_len=256, vocab_size=256, pairs=(4, 8, 16, 32, 64), state_size=16, chunk_size=64,
                llama_ffn=416, test_rows=1000, budget_s=150.0,
                train=TrainConfig(max_steps=5000, batch_size=256, block_size=256, lr=2e-3, min_lr=2e-4,
                                  warmup_steps=500, weight_decay=0.1, eval_interval=1000, eval_batches=4,
                                  log_interval=50)),
}


# ---------------------------------------------------------------------------- the task


def token_ranges(vocab_size: int) -> tuple[range, range]:
    """(keys, values): token 0 is padding, keys take the lower half of the rest, values the upper."""
    n_keys = (vocab_size - 1) // 2
    return range(1, 1 + n_keys), range(1 + n_keys, vocab_size)


def mqar_examples(rows: int, num_pairs: int, seq_len: int, vocab_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` sequences of N pairs: x (rows, T) token ids and y (rows, T) targets, y[r, t] = the value
    answering the key x[r, t] at the query positions and -100 everywhere else."""
    keys_range, values_range = token_ranges(vocab_size)
    if num_pairs > len(keys_range):
        raise ValueError(f"{num_pairs} distinct keys do not fit in the {len(keys_range)} key tokens of a "
                         f"vocabulary of {vocab_size}; use vocab_size >= {2 * num_pairs + 2} or fewer pairs")
    if 2 * num_pairs + 2 > seq_len:
        raise ValueError(f"{num_pairs} key-value pairs take {2 * num_pairs} tokens, leaving no room for a query "
                         f"in seq_len={seq_len}; use seq_len >= {2 * num_pairs + 2}")

    def distinct(n_tokens: int, k: int) -> torch.Tensor:
        """(rows, k): k distinct numbers of [0, n_tokens) per row, in random order."""
        return torch.rand(rows, n_tokens, generator=generator).argsort(-1)[:, :k]

    keys = distinct(len(keys_range), num_pairs) + keys_range.start  # (rows, N)
    values = distinct(len(values_range), num_pairs) + values_range.start  # (rows, N)
    n_queries = min(num_pairs, (seq_len - 2 * num_pairs) // 2)
    asked = distinct(num_pairs, n_queries)  # (rows, Q): which pairs are queried, in query order
    tokens = torch.full((rows, seq_len + 1), PAD, dtype=torch.long)  # one more: the targets are tokens[1:]
    tokens[:, 0:2 * num_pairs:2], tokens[:, 1:2 * num_pairs:2] = keys, values
    query_at = 2 * num_pairs + 2 * torch.arange(n_queries)  # (Q,) positions of the queried keys
    tokens[:, query_at], tokens[:, query_at + 1] = keys.gather(1, asked), values.gather(1, asked)
    targets = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, query_at] = values.gather(1, asked)
    return tokens[:, :-1], targets


def mqar_batch(rows: int, pairs: tuple[int, ...], seq_len: int, vocab_size: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (rows, T): each row a sequence of `mqar_examples` with its own N drawn uniformly from `pairs`."""
    choice = torch.randint(len(pairs), (rows,), generator=generator)  # (rows,) index into pairs
    x = torch.empty(rows, seq_len, dtype=torch.long)
    y = torch.empty(rows, seq_len, dtype=torch.long)
    for i, n in enumerate(pairs):
        where = (choice == i).nonzero()[:, 0]
        if len(where):
            x[where], y[where] = mqar_examples(len(where), n, seq_len, vocab_size, generator)
    return x, y


def mqar_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over the answer positions (the -100 targets are skipped, as in `lm_loss`),
    and the share of answers whose argmax is right, which the loop logs as "accuracy"."""
    x, y = batch  # (B, T), (B, T)
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    answer = y != IGNORE_INDEX
    # Sums, not a boolean index: indexing by a mask would synchronise a GPU every step.
    accuracy = ((logits.argmax(-1) == y) & answer).sum() / answer.sum().clamp_min(1)
    return loss, {"accuracy": accuracy.detach()}


@torch.no_grad()
def recall_accuracy(model, num_pairs: int, rows: int, seq_len: int, vocab_size: int, device: torch.device,
                    dtype: torch.dtype, seed: int = 0, batch_size: int = 64) -> float:
    """Share of answers whose argmax is the right value, over `rows` fresh sequences of N pairs.
    The test sequences depend on (seed, N) only, so every model is tested on the same ones."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + num_pairs)
    autocast = dtype if dtype != torch.float32 else None
    correct = total = 0
    for start in range(0, rows, batch_size):
        x, y = mqar_batch(min(batch_size, rows - start), (num_pairs,), seq_len, vocab_size, generator)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(x)  # (B, T, V)
        answer = y != IGNORE_INDEX
        correct += int((logits.argmax(-1) == y)[answer].sum())
        total += int(answer.sum())
    model.train(was_training)
    return correct / total


# ---------------------------------------------------------------------------- the models


def model_configs(size: str) -> dict:
    """{kind: config} at the size's width, built from the `tiny` presets of both families. The three
    counts are within `PARAMETER_TOLERANCE` of each other (tests/architectures/mamba2_hybrid/test_mqar.py):
    two Llama layers (attention + SwiGLU) weigh about four single-mixer Mamba-2 layers, and
    `llama_ffn` was picked to close the rest of the gap."""
    s = SIZES[size]
    D, T, V = s["width"], s["seq_len"], s["vocab_size"]
    attention = dataclasses.replace(llama_preset("tiny"), vocab_size=V, hidden_size=D, intermediate_size=s["llama_ffn"],
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=None,
                                    max_position_embeddings=T)
    # Mamba-2 layers of inner width 2D (heads of P = 16) and a small state, N = state_size.
    mamba = dataclasses.replace(mamba_preset("tiny"), vocab_size=V, hidden_size=D, mamba_num_heads=2 * D // 16,
                                mamba_head_dim=16, ssm_state_size=s["state_size"], n_groups=1, chunk_size=s["chunk_size"],
                                num_attention_heads=4, num_key_value_heads=2, head_dim=2 * D // 4,
                                max_position_embeddings=T)
    return {"attention": attention,
            "mamba2": dataclasses.replace(mamba, num_hidden_layers=4, hybrid_override_pattern="MMMM"),
            "hybrid": dataclasses.replace(mamba, num_hidden_layers=4, hybrid_override_pattern="MM*M")}


# ---------------------------------------------------------------------------- the runs


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_n, by_step) = plt.subplots(1, 2, figsize=(12, 4.2))
    for kind, r in results["models"].items():
        label = f"{kind} ({r['parameters']:,} params)"
        pairs = sorted(int(n) for n in r["accuracy"])
        by_n.plot(pairs, [r["accuracy"][str(n)] for n in pairs], marker="o", label=label)
        entries = [json.loads(line) for line in (out / kind / "metrics.jsonl").read_text().splitlines()]
        train_acc = [e for e in entries if "accuracy" in e]
        by_step.plot([e["step"] for e in train_acc], [e["accuracy"] for e in train_acc], label=label)
    by_n.plot(pairs, [1 / n for n in pairs], "k--", lw=1, label="1/N: one of the N values, at random")
    by_n.set_xscale("log", base=2)
    by_n.set(xlabel="key-value pairs N", ylabel="test accuracy at the answers", ylim=(-0.02, 1.02),
             title="recall after training")
    by_n.set_xticks(pairs, [str(n) for n in pairs])
    by_step.set(xlabel="optimizer step", ylabel="training accuracy (mixture of N)", ylim=(-0.02, 1.02),
                title="during training")
    for ax in (by_n, by_step):
        ax.grid(alpha=0.3)
        ax.legend()
    s = results["setup"]
    fig.suptitle(f"MQAR, T = {s['seq_len']}, D = {s['width']}, {results['steps']} steps: {results['device']}")
    fig.tight_layout()
    path = out / "mqar.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@command_line
def main(argv=None) -> dict:
    p = experiment_parser("python -m architectures.mamba2_hybrid.experiments.mqar", "runs/mamba2-mqar", SIZES,
                          "notes/figures/mamba2-mqar-cpu.png")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps of every model")
    p.add_argument("--budget-s", type=float, default=None,
                   help="cut the step count so the three runs fit this many seconds (default: the size's)")
    p.add_argument("--test-rows", type=int, default=None, help="test sequences per N")
    args = p.parse_args(argv)
    if args.plot_only:
        return redraw(args, plot)
    t0 = time.perf_counter()
    s = SIZES[args.size]
    train_cfg = size_train_config(s["train"], args, ("device", "batch_size"))
    device = resolve_device(train_cfg.device)
    dtype = compute_dtype(train_cfg.dtype, device)
    steps = args.max_steps or train_cfg.max_steps
    budget = args.budget_s if args.budget_s is not None else s["budget_s"]
    test_rows = args.test_rows or s["test_rows"]
    T, V, pairs = s["seq_len"], s["vocab_size"], s["pairs"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    configs = model_configs(args.size)
    models = {}
    for kind, cfg in configs.items():
        torch.manual_seed(train_cfg.seed)  # each model's initialisation depends on the seed only
        models[kind] = build_model(cfg)
        print(f"{kind}: {parameter_counts(models[kind])['parameters']:,} parameters; {describe(cfg)}", flush=True)

    def sample_batch(split: str, n: int, generator: torch.Generator):
        return mqar_batch(n, pairs, T, V, generator)

    step_s = None
    if budget:
        batch = sample_batch("train", train_cfg.batch_size, batch_generator(train_cfg.seed, "train", 0))
        step_s = interleaved_step_times({k: copy.deepcopy(m) for k, m in models.items()}, mqar_loss, batch, device,
                                        dtype, rounds=3)
        fits = int(budget / sum(step_s.values()))
        print("step times (taking turns): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in step_s.items()), flush=True)
        if fits < steps:
            print(f"{steps} steps of the three models would take {steps * sum(step_s.values()):.0f} s, over the "
                  f"budget of {budget:.0f} s: training {fits} steps each", flush=True)
            steps = fits
    run_cfg = with_steps(train_cfg, steps, evals=5)

    results = {"command": "python -m architectures.mamba2_hybrid.experiments.mqar " + " ".join(sys.argv[1:] if argv is None else argv),
               "size": args.size, "device": device_label(device), "dtype": str(dtype).replace("torch.", ""),
               "steps": steps, "train": dataclasses.asdict(run_cfg),
               "setup": {"width": s["width"], "seq_len": T, "vocab_size": V, "pairs": list(pairs),
                         "test_rows_per_n": test_rows, "keys": len(token_ranges(V)[0]),
                         "values": len(token_ranges(V)[1])},
               "models": {}}
    for kind, model in models.items():
        print(f"---- {kind}", flush=True)
        result = train(model, mqar_loss, sample_batch, run_cfg, out / kind)
        accuracy = {str(n): recall_accuracy(model, n, test_rows, T, V, device, dtype, seed=run_cfg.seed)
                    for n in pairs}
        print(f"{kind}: test accuracy " + ", ".join(f"N={n} {a:.3f}" for n, a in accuracy.items()), flush=True)
        results["models"][kind] = {**parameter_counts(model), "config": describe(configs[kind]),
                                   "accuracy": accuracy, "final_val_loss": result.val_loss,
                                   "train_s": result.elapsed_s,
                                   **({"step_s_interleaved": step_s[kind]} if step_s else {})}
    counts = {k: r["parameters"] for k, r in results["models"].items()}
    results["parameter_spread"] = parameter_spread(counts)
    results["wall_s"] = time.perf_counter() - t0
    save_figure(plot(results, out), args.figure)
    atomic_write_json(out / "results.json", results)
    for kind, r in results["models"].items():
        print(f"mqar model={kind} params={r['parameters']} steps={steps} train_s={r['train_s']:.1f} "
              + " ".join(f"acc_n{n}={a:.4f}" for n, a in r["accuracy"].items()), flush=True)
    print(f"parameter counts differ by {results['parameter_spread']:.1%} of the largest; wall time "
          f"{results['wall_s']:.0f} s on {results['device']}", flush=True)
    return results


if __name__ == "__main__":
    main()

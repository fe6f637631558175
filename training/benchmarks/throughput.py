"""Training throughput of the shared loop: tokens/s, step time, peak memory and MFU.

    python -m training.benchmarks.throughput --preset gpt2-124m --compile --batch-size 16 --seq-len 1024
    torchrun --nproc-per-node 2 -m training.benchmarks.throughput --preset gpt2-124m --compile --parallel ddp

It runs the real loop (`training.trainer.train`, not a copy) on synthetic tokens, so the
figure is the loop's own speed with data loading included but no dataset to prepare. The
first `--warmup` steps (compilation, allocator warm-up) are excluded; then `--steps` steps are
timed by the loop's own log entries. MFU = tokens/s x FLOPs per token / (GPUs x dense bf16
peak), with FLOPs per token from the architecture's `flops_per_token`.
`--arch` is any family of the architecture registry (trained with the loss its train.py
trains with, Mixtral's auxiliary losses included), or `gpt2-transformers`, the baseline
(nanoGPT's GPT-2 124M, as transformers implements it; needs the test extra) through the same
loop; `--data-on-device` takes data loading out of the step, so each figure has its reference
in the same session.
Prints one parseable line: `train_benchmark key=value ...`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics

import torch
from torch import nn

from architectures import registry
from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from architectures.utils.device import add_device_option, add_dtype_option
from architectures.common.loss import lm_loss
from training.train_config import TrainConfig
from training.trainer import train

BASELINE = "gpt2-transformers"


def architecture(name: str):
    """(presets, build_model(config), flops_per_token, loss_fn) of a registered family, or of the baseline."""
    if name == BASELINE:
        return (*gpt2_baseline(), lm_loss)
    # The step the family's train.py takes (its registered loss), so a mixture of experts is timed
    # with its auxiliary losses.
    f = registry.family(name)
    return f.config.PRESETS, f.model_class, f.flops_per_token, f.loss


def gpt2_baseline():
    """The baseline: GPT-2 124M (nanoGPT's model), here transformers'
    `GPT2LMHeadModel` with its SDPA attention, in the same loop. Its matmuls cost what the
    `gpt2-124m` Llama's do (4 D^2 attention + 8 D^2 MLP weights per layer, the V x D head), so the
    two MFUs compare like for like. transformers is a test dependency, imported only here."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise UserRuntimeError(f"--arch {BASELINE} runs transformers' GPT-2, and transformers is not installed "
                               f"({e}); it comes with the test extra: pip install -e '.[test]'") from None

    from architectures.llama3.config import LlamaConfig

    class LogitsOnly(nn.Module):
        def __init__(self, cfg: LlamaConfig):
            super().__init__()
            self.config = cfg
            self.gpt2 = GPT2LMHeadModel(GPT2Config(
                vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, attn_implementation="sdpa"))

        def forward(self, input_ids):
            return self.gpt2(input_ids=input_ids, use_cache=False).logits

    def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
        D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        return 3 * (2 * (12 * L * D * D + V * D) + 2 * L * D * (seq_len + 1))

    from architectures.llama3 import PRESETS

    return {"gpt2-124m": PRESETS["gpt2-124m"]}, LogitsOnly, flops_per_token


@command_line
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m training.benchmarks.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llama3", choices=[*registry.language_models(), BASELINE],
                   help=f"an architecture family, or {BASELINE}: the baseline, transformers' GPT-2 in the same loop")
    p.add_argument("--preset", default=None, help="a preset of --arch (default: gpt2-124m where it has one)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss and the model inside it")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block's activations in the backward pass")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: replicate the model (ddp) or shard it (fsdp)")
    add_device_option(p)
    p.add_argument("--data-on-device", action="store_true",
                   help="draw the synthetic tokens on the GPU: no host data loading, the reference for data_fraction")
    add_dtype_option(p)
    p.add_argument("--profile-out", default=None, help="write a profiler trace of a few steps into this directory")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "steps", "warmup", "grad_accum_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.warmup:
        p.error(f"--steps must be a multiple of --warmup (the loop logs every --warmup steps); "
                f"got --steps {args.steps}, --warmup {args.warmup}")
    if args.data_on_device and not torch.cuda.is_available():
        raise UserRuntimeError("--data-on-device needs a CUDA GPU (it draws the tokens there), and this torch "
                               "sees none; leave it out")

    presets, model_cls, flops, loss_fn = architecture(args.arch)
    if args.preset is None and "gpt2-124m" not in presets:
        raise ValueError(f"{args.arch} has no gpt2-124m preset; pass --preset, one of {sorted(presets)}")
    preset = args.preset or "gpt2-124m"
    if preset not in presets:
        raise ValueError(f"unknown {args.arch} preset {preset!r}; choose one of {sorted(presets)}")
    model_cfg = presets[preset]
    if args.seq_len > model_cfg.max_position_embeddings:
        model_cfg = dataclasses.replace(model_cfg, max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    model = model_cls(model_cfg)
    vocab = model_cfg.vocab_size

    def sample_on_host(split, n, generator):
        x = torch.randint(0, vocab, (n, args.seq_len + 1), generator=generator)
        return x[:, :-1], x[:, 1:]

    def sample_on_device(split, n, generator):
        # On the current GPU, which under torchrun the loop has chosen by the time it samples.
        x = torch.randint(0, vocab, (n, args.seq_len + 1), device="cuda")
        return x[:, :-1], x[:, 1:]

    sample_batch = sample_on_device if args.data_on_device else sample_on_host

    cfg = TrainConfig(
        max_steps=args.warmup + args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
        block_size=args.seq_len, warmup_steps=1, log_interval=args.warmup, eval_interval=args.warmup + args.steps,
        eval_batches=1, device=args.device, dtype=args.dtype, compile=args.compile, parallel=args.parallel,
        activation_checkpointing=args.activation_checkpointing, profile=args.profile_out is not None,
    )
    entries: list[dict] = []
    train(model, loss_fn, sample_batch, cfg, args.profile_out, flops_per_token=flops(model_cfg, args.seq_len),
          on_log=lambda e: entries.append(e) if "tokens_per_s" in e else None)
    if not entries:
        return {}  # not the main process: it reports nothing
    timed = entries[1:]  # the first entry covers the warm-up steps
    tokens_per_s = statistics.mean(e["tokens_per_s"] for e in timed)
    result = {
        "arch": args.arch, "preset": preset, "compile": int(args.compile), "parallel": args.parallel,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "batch": args.batch_size, "seq": args.seq_len, "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 1),
        "tokens_per_s": round(tokens_per_s), "step_ms": round(1000 * args.batch_size * args.seq_len / tokens_per_s, 2),
        "data_fraction": round(statistics.mean(e["data_fraction"] for e in timed), 4),
    }
    if "peak_memory_gb" in timed[-1]:
        result["peak_memory_gb"] = round(timed[-1]["peak_memory_gb"], 2)
        result["state_memory_gb"] = round(timed[-1]["state_memory_gb"], 2)
    if "mfu" in timed[-1]:
        result["mfu"] = round(statistics.mean(e["mfu"] for e in timed), 4)
    if torch.cuda.is_available() and cfg.device != "cpu":
        result["gpu"] = torch.cuda.get_device_name().replace(" ", "_")
    print("train_benchmark " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return result


if __name__ == "__main__":
    main()

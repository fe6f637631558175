"""Memory and speed of fine-tuning a Llama-3.2-1B-shaped model: full vs LoRA, plain vs chunked loss, bf16 vs NF4 base.

    python -m training.lora.benchmarks.chunked_loss                 # one GPU, about 3 minutes
    python -m training.lora.benchmarks.chunked_loss --quick         # tiny sizes on the CPU: checks the script runs

Random weights of the published shape (128,256-token vocabulary, 16 layers of 2,048), rows of
2,048 tokens, bf16 autocast, eager mode, AdamW. Each configuration trains `--steps` steps on the
same batches and prints one line: peak memory (torch.cuda.max_memory_allocated over the steps),
tokens/s over the steps after the first two, and the loss at the last step.

- full / LoRA with plain logits vs with `--loss-chunk` (`linear_cross_entropy`): the chunked
  loss's peak memory against the plain one's, at what throughput;
- LoRA over a bf16 base vs QLoRA (the same adapters over an NF4 base, `quantize(model, "nf4")`):
  peak memory and the loss after the same steps.
The batches are learnable (each row repeats a random 64-token phrase), so the loss falls and
"the same loss after the same steps" means something.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time

import torch

from architectures.llama3 import Llama3, preset
from architectures.utils.command_line import ArgumentParser, command_line
from training.lora import ALL_PROJECTIONS, LoRAConfig, apply_lora, trainable_parameters
from training.sft.loss import sft_loss

CONFIGS = [  # name, lora, loss chunk, base storage, activation checkpointing
    ("full, plain logits", False, 0, "fp32", False),
    ("full, chunked loss", False, 1024, "fp32", False),
    ("lora, plain logits", True, 0, "bf16", False),
    ("lora, chunked loss", True, 1024, "bf16", False),
    ("qlora nf4, chunked loss", True, 1024, "nf4", False),
    # With activation checkpointing (as QLoRA is run in practice) the weights, not the
    # activations, dominate memory: the comparison the NF4 base is about.
    ("lora bf16, plain, checkpointed", True, 0, "bf16", True),
    ("lora bf16, chunked, checkpointed", True, 1024, "bf16", True),
    ("qlora nf4, chunked, checkpointed", True, 1024, "nf4", True),
]


def batches(vocab: int, rows: int, seq: int, steps: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        phrase = torch.randint(0, vocab, (rows, 64), generator=g)
        ids = phrase.repeat(1, seq // 64 + 2)[:, :seq + 1]
        out.append({"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)})
    return out


def run(name: str, lora: bool, chunk: int, base: str, checkpointed: bool, cfg, data: list[dict], device, dtype) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama3(cfg)
    model.gradient_checkpointing = checkpointed
    if base == "bf16":
        model.to(torch.bfloat16)
    if base == "nf4":
        from inference.quantized_linear import quantize

        model.to(torch.bfloat16)
        quantize(model, "nf4", group_size=64)
    if lora:
        apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=ALL_PROJECTIONS))
        for p in model.parameters():  # adapters train in fp32 whatever the base's storage
            if p.requires_grad:
                p.data = p.data.float()
    trainable, total = trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4 if not lora else 1e-3,
                            fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss_value = [], float("nan")
    for batch in data:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss, metrics = sft_loss(model, batch, chunk_size=chunk)
        (loss / metrics["num_tokens"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss_value = float(loss / metrics["num_tokens"])
    tokens = data[0]["input_ids"].numel()
    timed = times[2:] if len(times) > 2 else times
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    result = {"config": name, "trainable": trainable, "total": total, "peak_gib": peak,
              "tokens_per_s": tokens * len(timed) / sum(timed), "final_loss": loss_value}
    print("RESULT " + json.dumps(result), flush=True)
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@command_line
def main(argv=None) -> list[dict]:
    ap = ArgumentParser(prog="python -m training.lora.benchmarks.chunked_loss", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU: a smoke test of the script")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration (the first is not timed)")
    ap.add_argument("--rows", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--only", default="", help="run only the configurations whose name contains this text")
    args = ap.parse_args(argv)
    for name in ("steps", "rows", "seq"):
        if getattr(args, name) < 1 + (name == "steps"):
            ap.error(f"--{name} must be >= {1 + (name == 'steps')}, got {getattr(args, name)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cfg = preset("llama-3.2-1b")
    if args.quick:
        cfg = dataclasses.replace(cfg, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        args.steps, args.rows, args.seq = 3, 2, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = batches(cfg.vocab_size, args.rows, args.seq, args.steps, device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{args.rows} rows x {args.seq} tokens, {args.steps} steps, bf16 autocast, eager", flush=True)
    results = []
    for name, lora, chunk, base, checkpointed in CONFIGS:
        if args.only not in name:
            continue
        try:
            results.append(run(name, lora, chunk, base, checkpointed, cfg, data, device, dtype))
        except Exception as e:  # one failure must not lose the other rows
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
    for a, b in (("full, chunked loss", "full, plain logits"), ("lora, chunked loss", "lora, plain logits"),
                 ("lora bf16, chunked, checkpointed", "lora bf16, plain, checkpointed"),
                 ("qlora nf4, chunked, checkpointed", "lora bf16, chunked, checkpointed"),
                 ("qlora nf4, chunked loss", "lora, chunked loss")):
        ra, rb = (next((r for r in results if r["config"] == n), None) for n in (a, b))
        if ra and rb:
            print(f"RATIO {a} / {b}: peak memory {ra['peak_gib'] / rb['peak_gib']:.3f}x, tokens/s "
                  f"{ra['tokens_per_s'] / rb['tokens_per_s']:.3f}x, final loss {ra['final_loss']:.4f} vs {rb['final_loss']:.4f}")
    print(f"\n{'config':34s} {'trainable':>14s} {'peak GiB':>9s} {'tokens/s':>10s} {'final loss':>10s}")
    for r in results:
        share = f"{r['trainable'] / r['total']:.2%}"
        print(f"{r['config']:34s} {share:>14s} {r['peak_gib']:9.2f} {r['tokens_per_s']:10.0f} {r['final_loss']:10.4f}")
    return results


if __name__ == "__main__":
    main()

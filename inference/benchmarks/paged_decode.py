"""Time one decode step's attention, per layer: the batched gather against the Triton kernel.

    python -m inference.benchmarks.paged_decode            # the defaults, on the GPU
    python -m inference.benchmarks.paged_decode --sweep    # every (tile, warps, stages) setting
    python -m inference.benchmarks.paged_decode --shape deepseek-v3 --batch 32 --context 8192 [--sweep]
    python -m inference.benchmarks.paged_decode --kv-dtype int8 --batch 32 --context 8192 [--sweep]

The batch is a mid-run decode step of `python -m inference.benchmarks.throughput`'s workload: 64 sequences
whose contexts are a prompt of U[32, 512] tokens plus 128 generated ones, the attention shape of
Llama-3.2-1B (H=32 query heads, K=8 KV heads, d=64), blocks of 16 scattered at random over the
pool, bf16. The kernel is checked against `paged_attention` before it is timed. Prints one
`bench` line per measurement: microseconds per call (CUDA events over --iters replays of a CUDA
graph of one call, as the engine replays its decode steps; --no-graphs: eager calls) and the
K/V bytes the step must read divided by that time, against the H100 SXM's 3.35 TB/s.

--shape deepseek-v3 times multi-head latent attention's absorbed decode instead: 128 query heads over
one cached latent row per token of 576 numbers (c_kv 512 + the RoPE key 64), the values being the
row's first 512 (`paged_latent_decode_attention`), against the same gather path the engine runs
without the kernel. --context fixes every sequence's context (0: the workload's mixture).
--kv-dtype int8 / fp8 times the kernel reading a quantized cache (inference/quantized_kv.py): codes with
a scale per token and head, checked against the gather path on the dequantized cache.
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from architectures.common.cache import KVSpec
from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from inference.benchmarks.workloads import quantized_blocks, scattered_seqs
from inference.paged_attention import attention_mask, paged_attention
from inference.quantized_kv import bytes_per_token, kv_format
from inference.step_metadata import build_metadata
from inference.triton_kivi_attention import paged_int4_decode_attention
from inference.triton_paged_attention import paged_decode_attention, paged_latent_decode_attention


def microseconds(fn, iters: int, graph: bool = True) -> float:
    """GPU time per call. graph: capture one call in a CUDA graph and time its replays, as the engine
    replays its decode steps, so that the host's Python and launch costs are left out."""
    fn()  # compile, warm the caches
    torch.cuda.synchronize()
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def grid_settings(spec: str) -> list[dict]:
    """'tile=64,128 num_warps=4' -> [{'tile': 64, 'num_warps': 4}, {'tile': 128, 'num_warps': 4}]."""
    known = ("tile", "num_warps", "num_stages", "splits", "heads_per_program", "max_registers")
    axes = []
    for item in spec.split():
        name, _, values = item.partition("=")
        if name not in known or not values:
            raise ValueError(f"--grid entry {item!r}: write NAME=V1,V2 with NAME one of {', '.join(known)}")
        axes.append([(name, launch_value(v, f"--grid entry {item!r}")) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def launch_value(text: str, where: str) -> int | None:
    """A launch setting's value: a whole number >= 1, or None (the kernel's automatic choice)."""
    if text == "None":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{where}: {text!r} is not a whole number >= 1 (or None for the automatic choice)")
    return int(text)


def parse_args(argv) -> tuple:
    """(args, the --grid settings or None), every value checked before any GPU work."""
    p = ArgumentParser(prog="python -m inference.benchmarks.paged_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="sequences in the decode step")
    p.add_argument("--generated", type=int, default=128, help="tokens generated so far, on top of each prompt")
    p.add_argument("--iters", type=int, default=200, help="calls timed per measurement")
    p.add_argument("--sweep", action="store_true", help="time every tile in (32, 64, 128) x warps x stages")
    p.add_argument("--seed", type=int, default=0, help="seeds the context lengths, the block layout and the tensors")
    p.add_argument("--shape", choices=("llama-3.2-1b", "deepseek-v3"), default="llama-3.2-1b",
                   help="attention shape: GQA 32/8 heads of 64, or MLA's latent (128 heads, rows of 576)")
    p.add_argument("--context", type=int, default=0, help="every sequence's context; 0: prompt U[32, 512] + generated")
    p.add_argument("--splits", default=None,
                   help="comma list of split counts to time with the default settings (None: the automatic one)")
    p.add_argument("--grid", default="",
                   help="time every combination of the listed launch settings, e.g. "
                        "'tile=64,128 num_warps=4,8 num_stages=2,3 splits=None,4' (overrides --sweep and --splits)")
    p.add_argument("--kv-dtype", choices=("bf16", "int8", "fp8", "int4"), default="bf16",
                   help="how the Llama-shaped cache stores K/V: bf16, int8 / fp8 codes with a scale per token and "
                        "head, or int4 (KIVI, blocks of 64 tokens, inference/triton_kivi_attention.py)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="time replays of a CUDA graph of one call (the GPU's time); --no-graphs: eager calls, "
                        "host overhead included")
    args = p.parse_args(argv)
    for flag, value, least in (("--batch", args.batch, 1), ("--generated", args.generated, 0),
                               ("--iters", args.iters, 1), ("--context", args.context, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    grid = grid_settings(args.grid) if args.grid else None  # a mistyped grid is refused before any work
    args.splits = args.splits and [launch_value(n, f"--splits {args.splits}") for n in args.splits.split(",")]
    if args.shape == "deepseek-v3" and args.kv_dtype != "bf16":
        raise ValueError(f"--shape deepseek-v3 times the latent cache in bf16; drop --kv-dtype {args.kv_dtype}")
    if args.kv_dtype == "int4" and args.sweep:
        raise ValueError("--sweep lists the bf16/int8 kernel's settings; for int4 give --grid 'num_warps=.. "
                         "num_stages=.. splits=..'")
    return args, grid


@dataclass
class Case:
    """What one run times: the kernel (called with launch settings) on the caches that the gather path reads
    too, the K/V bytes one call must read, and the launch settings to time."""
    kernel: Callable
    k_cache: torch.Tensor  # (num_blocks + 1, bs, K, d), dequantized where the kernel reads codes
    v_cache: torch.Tensor
    scale: float | None  # the softmax scale; None: 1 / sqrt(d)
    kv_bytes: float
    settings: list[dict]


def latent_case(args, q, num_blocks: int, bs: int, d: int, dv: int, tables, context_lens, contexts) -> Case:
    """MLA's absorbed decode: every head attends over one latent row per token, its values the row's first dv."""
    rows = torch.randn(num_blocks + 1, bs, d, device=q.device, dtype=torch.bfloat16)  # + the scratch block
    scale = 192 ** -0.5  # DeepSeek-V3's q.k width, 128 + 64

    def kernel(**launch):
        return paged_latent_decode_attention(q, rows, dv, tables, context_lens, scale=scale, **launch)
    settings = [dict(tile=t, num_warps=w, heads_per_program=h, splits=n)
                for t in (16, 32, 64) for w in (4, 8) for h in (16, 32, 64) for n in (None, 1)] if args.sweep \
        else [dict()]
    # views: keys are rows, values their prefix; each live row read once
    return Case(kernel, rows[:, :, None], rows[:, :, None, :dv], scale, sum(contexts) * d * rows.element_size(),
                settings)


def kv_case(args, q, num_blocks: int, bs: int, K: int, d: int, tables, context_lens, contexts, seqs) -> Case:
    """Llama's K and V, stored in bf16, or quantized as the engine stores them (--kv-dtype)."""
    int4 = args.kv_dtype == "int4"
    k_cache = torch.randn(num_blocks + 1, bs, K, d, device=q.device, dtype=torch.bfloat16)  # + the scratch block
    v_cache = torch.randn_like(k_cache)
    quant = {}
    if args.kv_dtype != "bf16":  # the kernel reads codes and scales; the gather path their dequantized values
        parts, k_cache, v_cache, residuals = quantized_blocks(args.kv_dtype, k_cache, v_cache, seqs)
        quant = {name: t for name, t in parts.items() if name not in ("k", "v")}
        stored_k, stored_v = parts["k"], parts["v"]
    else:
        stored_k, stored_v = k_cache, v_cache

    def kernel(**launch):
        if int4:
            return paged_int4_decode_attention(q, stored_k, quant["k_scale"], quant["k_zero"], stored_v,
                                               quant["v_scale"], quant["v_zero"], *residuals,
                                               torch.arange(args.batch, device=q.device), tables, context_lens,
                                               **launch)
        return paged_decode_attention(q, stored_k, stored_v, tables, context_lens, **quant, **launch)
    # K and V of every live token, read once: codes and scales, as the pool stores them (`bytes_per_token`;
    # int4's residual tokens are counted as codes too)
    fmt = kv_format(args.kv_dtype, torch.bfloat16, q.device, bs if int4 else None)
    kv_bytes = sum(contexts) * bytes_per_token([KVSpec(K, d)], fmt)
    settings = [dict(tile=t, num_warps=w, num_stages=s, splits=n) for t in (32, 64, 128) for w in (2, 4, 8)
                for s in (1, 2, 3) for n in (1, None)] if args.sweep else [dict(splits=1), dict(splits=None)]
    return Case(kernel, k_cache, v_cache, None, kv_bytes, settings)


def time_case(case: Case, gather: Callable, settings: list[dict], args, where: str) -> None:
    """Check the kernel against the gather path, then print one `bench` line for the gather and one per setting."""
    torch.testing.assert_close(case.kernel(), gather(), rtol=0, atol=2e-2)

    def report(name: str, us: float) -> None:
        print(f"bench kernel={name} {where} us={us:.1f} kv_tb_per_s={case.kv_bytes / us / 1e6:.2f}", flush=True)

    report("gather", microseconds(gather, args.iters, args.graphs))
    for launch in settings:
        try:
            torch.testing.assert_close(case.kernel(**launch), gather(), rtol=0, atol=2e-2)
            us = microseconds(lambda: case.kernel(**launch), args.iters, args.graphs)
        except AssertionError:
            raise
        except Exception as e:  # a setting the compiler refuses (too much shared memory): say so, go on
            print(f"bench kernel=triton {launch} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        report("triton " + " ".join(f"{k}={v}" for k, v in launch.items()), us)


@command_line
def main(argv=None) -> None:
    args, grid = parse_args(argv)
    if not torch.cuda.is_available():
        raise UserRuntimeError(f"this benchmark times GPU kernels and needs a CUDA GPU; this torch "
                               f"({torch.__version__}) sees none")
    latent = args.shape == "deepseek-v3"
    # (H query heads, K KV heads, key width, value width); MLA: one latent "head" read by all 128
    H, K, d, dv = (128, 1, 576, 512) if latent else (32, 8, 64, 64)
    bs, dev = (64 if args.kv_dtype == "int4" else 16), "cuda"
    g = random.Random(args.seed)
    contexts = [args.context or g.randint(32, 512) + args.generated for _ in range(args.batch)]
    num_blocks = sum(-(-c // bs) for c in contexts)
    seqs = scattered_seqs(contexts, bs, num_blocks, g)
    torch.manual_seed(args.seed)
    q = torch.randn(args.batch, H, d, device=dev, dtype=torch.bfloat16)
    meta = build_metadata(seqs, [0] * args.batch, bs, num_blocks, dev)
    mask = attention_mask(meta.q_pos, meta.block_tables.shape[1] * bs)
    context_lens = meta.positions[0] + 1
    kernel_tables = meta.block_tables.to(torch.int32)  # as the engine hands them to the kernel, once a step
    if latent:
        case = latent_case(args, q, num_blocks, bs, d, dv, kernel_tables, context_lens, contexts)
    else:
        case = kv_case(args, q, num_blocks, bs, K, d, kernel_tables, context_lens, contexts, seqs)
    settings = case.settings
    if args.splits and not args.sweep:
        settings = [dict(splits=n) for n in args.splits]
    if grid:
        settings = grid

    def gather():
        return paged_attention(q, case.k_cache, case.v_cache, meta.block_tables, meta.q_index, meta.out_index, mask,
                               case.scale)

    where = f"gpu={torch.cuda.get_device_name().replace(' ', '_')} torch={torch.__version__} shape={args.shape} " \
            f"batch={args.batch} context={args.context or 'mixed'} kv_dtype={args.kv_dtype} " \
            f"kv_mb={case.kv_bytes / 1e6:.1f}"
    time_case(case, gather, settings, args, where)


if __name__ == "__main__":
    main()

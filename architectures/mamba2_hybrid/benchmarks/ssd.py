"""Benchmark the SSD of Mamba-2 on one set of random inputs: the recurrence (the baseline) vs the
chunked algorithm, eager and compiled, vs transformers' pure-PyTorch chunked scan, in one process.

    python -m architectures.mamba2_hybrid.benchmarks.ssd               # GPU: bf16, B=2, T=4096, H=80 x P=64, N=128, Q=256
    python -m architectures.mamba2_hybrid.benchmarks.ssd --device cpu  # CPU: fp32, B=1, T=4096, H=8 x P=32, N=32, Q=64

Inputs as the mixer gives them to ssd.py: x (b, l, h, p), B and C (b, l, g, n) in --dtype, dt and A fp32;
every implementation computes in fp32 inside and returns y (b, l, h, p) in fp32.
  sequential        `ssd_sequential`, token by token: the reference, and the baseline of every ratio
  chunked           `ssd_chunked`, Listing 1 of arXiv:2405.21060 in plain PyTorch (einsums -> matmuls)
  chunked-compiled  torch.compile of `ssd_chunked`, by default on CUDA only (--compile / --no-compile)
  chunked-bf16-compiled  the same compiled, with the four big products' operands in bf16 (`matmul_dtype`):
                    the mamba_ssm kernel's precision split, on the tensor cores (bf16 inputs only)
  mamba-ssm         state-spaces/mamba's Triton kernel `mamba_chunk_scan_combined`, where `mamba_ssm` imports
                    (its Triton ops need no build: put the package's source on PYTHONPATH); y in x's dtype
  hf-chunked        transformers' `mamba2_chunk_scan`, its PyTorch path (never the mamba_ssm kernel). It
                    contracts by broadcasting into (b, T/Q, Q, Q, h, n) fp32 products, 86 GB at the GPU defaults,
                    so it runs on slices of heads of the same tensors (`head_slices`), each slice's product
                    within 1/8 of the GPU's memory (1 GiB on the CPU); the slices' times add up.
First every y is compared with the recurrence's (`bench_check ... max_abs_diff=`). Then forward + backward
from one upstream gradient (--no-backward: forward) is timed, the implementations taking turns in each
iteration, median reported; the recurrence on --seq-iters iterations only (1): it is slow, and its backward
is quadratic in T, autograd turning each token's slice x[:, t] into a zero-filled gradient of all of x.
One line each: `bench impl=... ms=... tokens_per_s=... [tflops=...] vs_sequential=...`, TFLOP/s counting
the chunked algorithm's matmul FLOPs (`ssd_flops`, x3 with the backward), so not given for the recurrence.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import time
import unittest.mock

import torch

from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from architectures.mamba2_hybrid.config import Mamba2HybridConfig
from architectures.mamba2_hybrid.flops import ssd_flops
from architectures.mamba2_hybrid.ssd import ssd_chunked, ssd_sequential
from architectures.utils.device import add_device_option, add_dtype_option, compute_dtype, device_label, resolve_device

IMPLS = ("sequential", "chunked", "chunked-compiled", "chunked-bf16-compiled", "mamba-ssm", "hf-chunked")
# Agreement with the recurrence required before timing, relative to |y|: fp32 inside differs by summation
# order only; bf16 operands (or a bf16 output) round to 8 bits of mantissa, 4e-3 per rounding.
TOLERANCE = {"chunked-bf16-compiled": 2e-2, "mamba-ssm": 2e-2}


def mamba_ssm_scan():
    """state-spaces/mamba's fused chunked scan, or None with the reason it does not import."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # ImportError, or a Triton/CUDA mismatch raised while its modules load
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    return mamba_chunk_scan_combined, None
# GPU: one layer of the mamba2-2.7b preset; CPU: Mamba2HybridConfig's defaults (the tiny layer), T still 4096.
DEFAULTS = {"cuda": dict(batch=2, seq_len=4096, heads=80, head_dim=64, state=128, chunk=256, warmup=3, iters=10),
            "cpu": dict(batch=1, seq_len=4096, heads=8, head_dim=32, state=32, chunk=64, warmup=1, iters=3)}


def hf_chunk_scan():
    """transformers' torch function itself: `inspect.unwrap` steps past the decorator that hands the call
    to mamba_ssm's Triton kernel where that is installed."""
    try:
        from transformers.models.mamba2 import modeling_mamba2
    except ImportError as e:
        raise UserRuntimeError(f'hf-chunked needs transformers ({e}), which comes with the test extra: '
                               f'pip install -e ".[test]"; or pass --impls sequential,chunked') from e
    scan = inspect.unwrap(modeling_mamba2.mamba2_chunk_scan)
    if scan.__code__.co_filename != modeling_mamba2.__file__:
        raise UserRuntimeError(f"transformers {modeling_mamba2.__name__}.mamba2_chunk_scan is not its PyTorch "
                               f"function here (a kernel wrapper from {scan.__code__.co_filename}); "
                               f"pass --impls sequential,chunked,chunked-compiled")
    return scan


@contextlib.contextmanager
def single_block_scans():
    """Inductor without split scans (one cumsum row spread over several Triton blocks): in torch 2.11 their
    code generation fails on `ssd_chunked`'s cumsums (seen on an H100) ("InductorError: TypeError: list indices must be
    integers or slices, not NoneType", in get_block_shape), while a row here is one chunk of Q numbers,
    which one block scans anyway. Patches a private hook while it is there; elsewhere inductor chooses."""
    from torch._inductor import ir
    if not (hasattr(ir.Scan, "num_splits") and hasattr(ir, "ReductionHint")):
        yield
        return
    one_block = classmethod(lambda cls, **kw: (ir.ReductionHint.DEFAULT, 1))
    with unittest.mock.patch.object(ir.Scan, "num_splits", one_block):
        yield


def hf_heads_per_call(b, T, h, g, n, p, Q, budget: int) -> int:
    """The most heads per call (a divisor of h/g, so a slice reads one group) whose largest broadcast
    product, b x ceil(T/Q)Q x Q x heads x max(n, p) fp32 numbers, fits in `budget` bytes."""
    per_head = b * -(-T // Q) * Q * Q * max(n, p) * 4
    fits = [k for k in range(1, h // g + 1) if (h // g) % k == 0 and k * per_head <= budget]
    return max(fits, default=1)


def hf_sliced(scan, k: int):
    def run(x, dt, A, B, C, Q):
        per_group = x.shape[2] // B.shape[2]
        return torch.cat([scan(x[:, :, s:s + k], dt[:, :, s:s + k], A[s:s + k], B[:, :, s // per_group][:, :, None],
                               C[:, :, s // per_group][:, :, None], Q) for s in range(0, x.shape[2], k)], dim=2)
    return run


def random_inputs(b, T, h, p, g, n, dtype, device, requires_grad):
    """Model-like values: dt log-uniform in [0.001, 0.1] and A = -1 .. -H, as `Mamba2Mixer` initialises them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, T, h, p, generator=gen)
    dt = torch.exp(torch.empty(b, T, h).uniform_(-6.9, -2.3, generator=gen))
    A = -torch.arange(1, h + 1, dtype=torch.float32)
    B, C = (torch.randn(b, T, g, n, generator=gen) for _ in range(2))
    dtypes = (dtype, torch.float32, torch.float32, dtype, dtype)
    inputs = [t.to(device, d).requires_grad_(requires_grad) for t, d in zip((x, dt, A, B, C), dtypes)]
    return inputs, torch.randn(b, T, h, p, generator=gen).to(device)


def time_round_robin(fns, inputs, grad, warmup, iters, seq_iters, device) -> dict[str, list[float]]:
    """Seconds per call (forward, and backward from `grad` unless None), the implementations taking turns."""
    def step(fn):
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        if grad is not None:
            y.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the host clock then covers every kernel of the step

    for name, fn in fns.items():
        for _ in range(min(warmup, 1) if name == "sequential" else warmup):
            step(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(iters):
        for name, fn in fns.items():
            if name != "sequential" or i < seq_iters:
                start = time.perf_counter()
                step(fn)
                times[name].append(time.perf_counter() - start)
    return times


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m architectures.mamba2_hybrid.benchmarks.ssd", description=__doc__.split("\n\n")[0])
    add_device_option(p)
    p.add_argument("--batch", type=int, default=None, help="b, sequences; None: 2 on a GPU, 1 on the CPU")
    p.add_argument("--seq-len", type=int, default=None, help="T, tokens per sequence; None: 4096")
    p.add_argument("--heads", type=int, default=None, help="H, SSM heads; None: 80 on a GPU, 8 on the CPU")
    p.add_argument("--head-dim", type=int, default=None, help="P, channels per head; None: 64 on a GPU, 32 on the CPU")
    p.add_argument("--state", type=int, default=None, help="N, state size; None: 128 on a GPU, 32 on the CPU")
    p.add_argument("--groups", type=int, default=1, help="G, groups of heads sharing B and C")
    p.add_argument("--chunk", type=int, default=None, help="Q, tokens per chunk; None: 256 on a GPU, 64 on the CPU")
    add_dtype_option(p, help="of x, B and C; auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                   help="time forward + backward (--no-backward: the forward only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time chunked-compiled; unset (%(default)s): on CUDA only")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (1 at most for sequential); "
                                                            "None: 3 on a GPU, 1 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations; None: 10 on a GPU, 3 on the CPU")
    p.add_argument("--seq-iters", type=int, default=1, help="timed iterations of sequential (at most --iters)")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (sequential always runs); "
                                                 f"None: all, chunked-compiled as --compile says")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "seq_len", "heads", "head_dim", "state", "groups", "chunk", "warmup", "iters", "seq_iters"):
        least, value = 0 if key == "warmup" else 1, getattr(args, key)
        if value < least:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {least}, got {value}")
    if args.heads % args.groups:
        raise ValueError(f"--heads {args.heads} is not divisible by --groups {args.groups}: each group of heads "
                         f"shares one B and one C")
    compile_it = device.type == "cuda" if args.compile is None else args.compile
    wanted = args.impls.split(",") if args.impls else [
        i for i in IMPLS if (compile_it or "compiled" not in i) and (device.type == "cuda" or i != "mamba-ssm")]
    unknown = [name for name in wanted if name not in IMPLS]
    if unknown:
        raise ValueError(f"unknown --impls {unknown[0]!r}; choose from {', '.join(IMPLS)}")
    wanted = ["sequential"] + [name for name in wanted if name != "sequential"]  # the baseline always runs

    b, T, h, P, g, n, Q = args.batch, args.seq_len, args.heads, args.head_dim, args.groups, args.state, args.chunk
    fns = {"sequential": lambda *t: ssd_sequential(*t)[0], "chunked": lambda *t: ssd_chunked(*t, Q)[0]}
    if "chunked-compiled" in wanted:
        compiled = torch.compile(ssd_chunked)
        fns["chunked-compiled"] = lambda *t: compiled(*t, Q)[0]
    if "chunked-bf16-compiled" in wanted:
        compiled_bf16 = torch.compile(ssd_chunked)
        fns["chunked-bf16-compiled"] = lambda *t: compiled_bf16(*t, Q, matmul_dtype=torch.bfloat16)[0]
    if "mamba-ssm" in wanted:
        scan, why = mamba_ssm_scan()
        if scan is None:
            print(f"bench_skip impl=mamba-ssm reason={why!r}", flush=True)
            wanted.remove("mamba-ssm")
        else:  # its y comes in x's dtype; .float() so that every implementation hands back the same thing
            fns["mamba-ssm"] = lambda x, dt, A, B, C: scan(x, dt, A, B, C, Q).float()
    slices = None
    if "hf-chunked" in wanted:
        budget = torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else 2 ** 30
        k = hf_heads_per_call(b, T, h, g, n, P, Q, budget)
        slices, run = h // k, hf_sliced(hf_chunk_scan(), k)
        fns["hf-chunked"] = lambda *t: run(*t, Q)
    fns = {name: fns[name] for name in wanted}
    dtype = compute_dtype(args.dtype, device)
    args.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    inputs, grad = random_inputs(b, T, h, P, g, n, dtype, device, args.backward)

    where = device_label(device).replace(" ", "_").replace("(", "").replace(")", "")
    sizes = f"dtype={args.dtype} batch={b} seq_len={T} heads={h} head_dim={P} state={n} groups={g} chunk={Q}"
    with single_block_scans() if any("compiled" in name for name in fns) else contextlib.nullcontext():
        reference = fns["sequential"](*inputs).detach()
        scale = reference.abs().max().item()
        for name, fn in list(fns.items())[1:]:  # on the same inputs
            err = (fn(*inputs).detach() - reference).abs().max().item()
            print(f"bench_check impl={name} vs=sequential max_abs_diff={err:.2e} max_abs_y={scale:.2e}", flush=True)
            if not err <= TOLERANCE.get(name, 1e-3) * max(scale, 1.0):
                raise RuntimeError(f"{name} differs from the recurrence by {err:.2e} (|y| <= {scale:.2e}): a bug")
        del reference
        times = time_round_robin(fns, inputs, grad if args.backward else None, args.warmup, args.iters,
                                 min(args.seq_iters, args.iters), device)
    flops = ssd_flops(Mamba2HybridConfig(mamba_num_heads=h, mamba_head_dim=P, ssm_state_size=n, n_groups=g,
                                         chunk_size=Q), T) * b * T * (3 if args.backward else 1)
    seconds = {name: statistics.median(times[name]) for name in fns}
    for name, s in seconds.items():
        extra = "" if name == "sequential" else f" tflops={flops / s / 1e12:.3f}"
        extra += f" head_slices={slices}" if name == "hf-chunked" else ""
        ratios = " ".join(f"vs_{o.replace('-', '_')}={seconds[o] / s:.2f}" for o in ("sequential", "hf-chunked", "mamba-ssm")
                          if o in seconds and o != name)
        print(f"bench impl={name} device={where} {sizes} pass={'fwd+bwd' if args.backward else 'fwd'} "
              f"iters={len(times[name])} ms={s * 1e3:.2f} tokens_per_s={b * T / s:.0f}{extra} {ratios}".rstrip(),
              flush=True)
    return [{"impl": name, "s": s, "tokens_per_s": b * T / s, "iters": len(times[name])}
            for name, s in seconds.items()]


if __name__ == "__main__":
    main()

"""Benchmark one MoE layer, forward + backward: our grouped dispatch vs transformers' own
MixtralSparseMoeBlock on the same weights vs a naive masked per-expert loop, in one process.

    python -m architectures.mixtral.benchmarks.moe_layer                      # GPU: 16k tokens, D=1024, F=3584, bf16
    python -m architectures.mixtral.benchmarks.moe_layer --device cpu         # CPU: 2k tokens, D=256, F=896, fp32

Implementations (same router and expert weights, same input, same upstream gradient):
  ours          `SparseMoE`: sort (token, expert) pairs by expert, one grouped GEMM per projection
                (torch's grouped_mm on CUDA bf16; one matmul per expert slice elsewhere)
  hf_grouped_mm transformers 5's block with experts_implementation="grouped_mm" (its default on GPU)
  hf_eager      transformers 5's block with "eager": a Python loop over experts, gather/index_add_
  naive         `masked_moe_reference`: every expert on every token, masked (E/k times the FLOPs)
The implementations take turns within every timed iteration (round robin); the median is reported.
Each prints one line: `moe_bench impl=... tokens_per_s=... ms=... tflops=... vs_hf_grouped_mm=... vs_naive=...`,
where TFLOP/s counts the useful (active) matmul FLOPs, 3 x 2 x N x (k x 3DF + DE).
"""

from __future__ import annotations

import statistics

import torch

from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from architectures.mixtral.config import MixtralConfig
from architectures.mixtral.model import SparseMoE, masked_moe_reference
from architectures.utils.device import add_device_option, resolve_device
from architectures.utils.timing import time_round_robin

IMPLS = ("ours", "hf_grouped_mm", "hf_eager", "naive")

DEFAULTS = {"cuda": dict(tokens=16384, hidden=1024, ffn=3584, dtype="bf16"),
            "cpu": dict(tokens=2048, hidden=256, ffn=896, dtype="fp32")}


def import_transformers():
    """transformers is the test oracle (the test extra), not a dependency of the zoo."""
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        raise UserRuntimeError(f'hf_grouped_mm and hf_eager need transformers ({e}), which comes with the test '
                               f'extra: pip install -e ".[test]"; or pass --impls ours,naive') from e
    return transformers, MixtralSparseMoeBlock


def build(args, device, dtype, wanted=IMPLS):
    cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k)
    torch.manual_seed(0)
    ours = SparseMoE(cfg, layer_idx=0)
    with torch.no_grad():
        # Router std 1/sqrt(D): logits of order 1, near-balanced routing as in a trained model.
        ours.gate.weight.normal_(std=args.hidden ** -0.5)
        ours.experts.gate_up_proj.normal_(std=0.02)
        ours.experts.down_proj.normal_(std=0.02)
    ours = ours.to(device, dtype)
    impls = {"ours": ours, "naive": lambda x: masked_moe_reference(ours, x)}
    hf_impls = [name for name in ("grouped_mm", "eager") if f"hf_{name}" in wanted]
    if hf_impls:
        transformers, MixtralSparseMoeBlock = import_transformers()
    for name in hf_impls:
        # One config per block: the block reads config._experts_implementation at every call.
        hf_cfg = transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                            num_local_experts=args.experts, num_experts_per_tok=args.top_k)
        hf_cfg._experts_implementation = name
        block = MixtralSparseMoeBlock(hf_cfg).to(device, dtype)
        # Same tensors, same layout: transformers 5 stores the experts fused exactly as we do.
        block.load_state_dict(ours.state_dict())
        impls[f"hf_{name}"] = block
    return impls


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m architectures.mixtral.benchmarks.moe_layer", description=__doc__.split("\n\n")[0])
    add_device_option(p)
    p.add_argument("--tokens", type=int, default=None,
                   help="N = batch x sequence; None: 16384 on a GPU, 2048 on the CPU")
    p.add_argument("--hidden", type=int, default=None, help="D, the model width; None: 1024 on a GPU, 256 on the CPU")
    p.add_argument("--ffn", type=int, default=None, help="F, one expert's width; None: 3584 on a GPU, 896 on the CPU")
    p.add_argument("--experts", type=int, default=8, help="E, experts in the layer")
    p.add_argument("--top-k", type=int, default=2, help="k, experts each token is routed to")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="None: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first; None: 5 on a GPU, 1 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations, whose median is reported; "
                                                           "None: 20 on a GPU, 3 on the CPU")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    args = p.parse_args(argv)
    wanted = args.impls.split(",")
    unknown = [name for name in wanted if name not in IMPLS]
    if unknown:
        raise ValueError(f"unknown --impls {unknown[0]!r}; choose from {', '.join(IMPLS)}")
    device = resolve_device(args.device)
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    args.iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 3)
    for flag, value, least in (("--tokens", args.tokens, 1), ("--hidden", args.hidden, 1), ("--ffn", args.ffn, 1),
                               ("--experts", args.experts, 1), ("--warmup", args.warmup, 0),
                               ("--iters", args.iters, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    impls = build(args, device, dtype, wanted)
    params = list(impls["ours"].parameters()) + [q for n in ("hf_grouped_mm", "hf_eager") if n in impls
                                                 for q in impls[n].parameters()]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    N, D, Fd, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    useful_flops = 3 * 2 * N * (k * 3 * D * Fd + D * E)
    with torch.no_grad():  # the same function, or the timing compares different work
        reference = impls["ours"](x).float()
        for name in wanted:
            err = (impls[name](x).float() - reference).norm() / reference.norm()
            print(f"moe_bench_check impl={name} rel_err_vs_ours={err:.2e}", flush=True)
    times = time_round_robin({name: impls[name] for name in wanted}, x, grad, params, args.warmup, args.iters, device)
    results = [{"impl": name, "s": statistics.median(times[name])} for name in wanted]
    base = {r["impl"]: r["s"] for r in results}
    for r in results:
        ratios = " ".join(f"vs_{other}={base[other] / r['s']:.2f}" for other in ("hf_grouped_mm", "hf_eager", "naive")
                          if other in base and other != r["impl"])
        r.update(tokens_per_s=N / r["s"], tflops=useful_flops / r["s"] / 1e12)
        print(f"moe_bench impl={r['impl']} device={where.replace(' ', '_')} dtype={args.dtype} tokens={N} hidden={D} "
              f"ffn={Fd} experts={E} top_k={k} pass=fwd+bwd ms={r['s'] * 1e3:.2f} tokens_per_s={r['tokens_per_s']:.0f} "
              f"tflops={r['tflops']:.2f} {ratios}".rstrip(), flush=True)
    return results


if __name__ == "__main__":
    main()

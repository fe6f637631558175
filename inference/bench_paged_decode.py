"""Time one decode step's attention, per layer: the batched gather against the Triton kernel.

    python -m inference.bench_paged_decode            # the defaults, on the GPU
    python -m inference.bench_paged_decode --sweep    # every (tile, warps, stages) setting

The batch is a mid-run decode step of `python -m inference.benchmark`'s workload: 64 sequences
whose contexts are a prompt of U[32, 512] tokens plus 128 generated ones, the attention shape of
Llama-3.2-1B (H=32 query heads, K=8 KV heads, d=64), blocks of 16 scattered at random over the
pool, bf16. The kernel is checked against `paged_attention` before it is timed. Prints one
`bench` line per measurement: microseconds per call (CUDA events over --iters calls) and the
K/V bytes the step must read divided by that time, against the H100 SXM's 3.35 TB/s.
"""

from __future__ import annotations

import random

import torch

from architectures.common.errors import ArgumentParser, UserRuntimeError, command_line
from inference.paged_attention import attention_mask, paged_attention
from inference.paged_cache import ScheduledSeq, build_metadata
from inference.triton_paged_attention import TILE_TOKENS, paged_decode_attention


def microseconds(fn, iters: int) -> float:
    fn()  # compile, warm the caches
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


@command_line
def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m inference.bench_paged_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="sequences in the decode step")
    p.add_argument("--generated", type=int, default=128, help="tokens generated so far, on top of each prompt")
    p.add_argument("--iters", type=int, default=200, help="calls timed per measurement")
    p.add_argument("--sweep", action="store_true", help="time every tile in (32, 64, 128) x warps x stages")
    p.add_argument("--seed", type=int, default=0, help="seeds the context lengths, the block layout and the tensors")
    args = p.parse_args(argv)
    for flag, value, least in (("--batch", args.batch, 1), ("--generated", args.generated, 0),
                               ("--iters", args.iters, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if not torch.cuda.is_available():
        raise UserRuntimeError(f"this benchmark times GPU kernels and needs a CUDA GPU; this torch "
                               f"({torch.__version__}) sees none")
    H, K, d, bs, dev = 32, 8, 64, 16, "cuda"
    g = random.Random(args.seed)
    contexts = [g.randint(32, 512) + args.generated for _ in range(args.batch)]
    num_blocks = sum(-(-c // bs) for c in contexts)
    free = list(range(num_blocks))
    g.shuffle(free)  # physical blocks in no particular order, as after a long run
    seqs = [ScheduledSeq([free.pop() for _ in range(-(-c // bs))], c - 1, c) for c in contexts]
    torch.manual_seed(args.seed)
    k_cache = torch.randn(num_blocks + 1, bs, K, d, device=dev, dtype=torch.bfloat16)  # + the scratch block
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(args.batch, H, d, device=dev, dtype=torch.bfloat16)
    meta = build_metadata(seqs, [0] * args.batch, bs, num_blocks, dev)
    mask = attention_mask(meta.q_pos, meta.block_tables.shape[1] * bs)
    context_lens = meta.positions[0] + 1

    def gather():
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.q_index, meta.out_index, mask)

    torch.testing.assert_close(paged_decode_attention(q, k_cache, v_cache, meta.block_tables, context_lens),
                               gather(), rtol=0, atol=2e-2)
    kv_bytes = sum(contexts) * K * d * 2 * k_cache.element_size()  # K and V of every live token, read once
    where = f"gpu={torch.cuda.get_device_name().replace(' ', '_')} torch={torch.__version__} batch={args.batch} " \
            f"kv_mb={kv_bytes / 1e6:.1f}"

    def report(name: str, us: float) -> None:
        print(f"bench kernel={name} {where} us={us:.1f} kv_tb_per_s={kv_bytes / us / 1e6:.2f}", flush=True)

    report("gather", microseconds(gather, args.iters))
    settings = [(t, w, s) for t in (32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)] if args.sweep \
        else [(TILE_TOKENS, 4, 2)]
    for tile, warps, stages in settings:
        us = microseconds(lambda: paged_decode_attention(q, k_cache, v_cache, meta.block_tables, context_lens,
                                                         tile=tile, num_warps=warps, num_stages=stages), args.iters)
        report(f"triton tile={tile} warps={warps} stages={stages}", us)


if __name__ == "__main__":
    main()

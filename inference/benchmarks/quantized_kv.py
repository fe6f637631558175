"""Quantized KV caches on a GPU: kernel correctness, capacity, speed and quality, in one run.

    python -m inference.benchmarks.quantized_kv                          # parts 1-3 (GPU), part 4 skipped
    python -m architectures.llama3.train --preset shakespeare --compile --out runs/shakespeare
    python -m inference.benchmarks.quantized_kv --checkpoint runs/shakespeare    # all four parts
    python -m inference.benchmarks.quantized_kv --quick --device cpu     # every part at toy sizes (the CPU test)

1. kernel: the Triton decode kernels on int8 / fp8 / int4 blocks against the gather path on the same blocks
   (Llama-3.2-1B attention shape, bf16 queries, contexts across block and tile edges): max abs diff.
   Without a GPU (--quick on a CPU) the gather path is compared with the reference instead.
2. capacity: the token slots the paged engine's pool holds within a fixed KV memory budget (--budget-gib),
   Llama-3.2-1B shape, for bf16, int8, fp8 (blocks of 16) and int4 (blocks of 64 = the KIVI key group,
   with a residual of 64 full-precision tokens per seat, --seats of them, taken out of the budget).
3. speed: output tokens/s, quantized against bf16 in the same process on the same random weights:
   (a) decode-heavy: --long-seqs sequences of --long-len prompt tokens, --long-new new tokens each;
   decode tokens/s with every sequence decoding (`decode_heavy` says how), int4 without CUDA graphs;
   (b) the same at the same KV memory, as a full server runs it: the bytes that --long-seqs bf16 sequences
   take hold more int8 or fp8 ones, and each format decodes as many sequences as fit in them;
   (c) the workload of `python -m inference.benchmarks.throughput` (64 prompts of U[32, 512] tokens, 256 new
   tokens, CUDA-graph decode), through `run_paged` (inference/benchmarks/workloads.py).
4. quality: nats per character on Tiny Shakespeare's validation split (its last 10%) for a checkpoint
   (--checkpoint), teacher-forced through a naive cache of each kv_dtype: each window of the model's
   context is fed in chunks of --chunk tokens, so every chunk reads the earlier ones back quantized.
   Relative to bf16 K/V; fp32 (model and cache) is printed beside.

Every option is checked before any part runs. Each measurement is one line `bench_quantized_kv part=...
key=value ...`; a part that fails prints its traceback and an `error=...` line, the others still run, a
table of all rows comes last, and then any failure (an error, a kernel off by more than the bound) ends
the command with exit status 1: a failure is not a result.
"""

from __future__ import annotations

import random
import sys
import time
import traceback

import torch

from architectures import registry
from architectures.utils.command_line import ArgumentParser, command_line
from inference.checkpoint_files import check_checkpoint
from inference.command_checks import check_at_least, check_positive, check_preset, family_presets
from inference.benchmarks.workloads import make_prompts, quantized_blocks, run_paged, scattered_seqs, sync
from inference.engine import EngineConfig, LLMEngine
from inference.kv_cache import NaiveKVCache
from inference.paged_attention import attention_mask, paged_attention, paged_attention_reference
from inference.kv_pool import PagedKVPool
from inference.sampling import SamplingParams
from inference.step_metadata import build_metadata
from inference.triton_kivi_attention import kivi_unavailable_reason, paged_int4_decode_attention
from inference.triton_paged_attention import paged_decode_attention, triton_unavailable_reason
from architectures.utils.device import add_device_option, resolve_device

ROWS: list[dict] = []  # every measurement, for the table at the end
PARTS = ("kernel", "capacity", "speed", "quality")


def report(**fields) -> None:
    ROWS.append(fields)
    print("bench_quantized_kv " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v).replace(" ", "_")


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. the kernel against the gather path ---------------------------------------------------------


def kernel_vs_gather(kv_dtype: str, device="cuda", H: int = 32, K: int = 8, d: int = 64, bs: int | None = None,
                     contexts=(1, 2, 15, 16, 17, 63, 64, 65, 129, 300, 1000, 2049), seed: int = 0) -> float:
    """Max abs difference between the Triton kernel on quantized blocks and the gather path on the same
    blocks (the gather dequantizes what it gathers; dequantizing the pool first is the same elementwise
    map). On a machine without the kernel, the gather path against the reference (both dequantized).
    int4 uses blocks of 64 tokens (the key group) and a residual per sequence (`quantized_blocks`)."""
    int4 = kv_dtype == "int4"
    bs = bs or (64 if int4 else 16)
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // bs) for c in contexts) + 4
    # Keys with a few large channels, as real keys have: the per-token scale must cover them.
    k = torch.randn(num_blocks + 1, bs, K, d, generator=g)
    k[..., :3] *= 8
    v = torch.randn(num_blocks + 1, bs, K, d, generator=g)
    k, v = (t.to(device=device, dtype=torch.bfloat16) for t in (k, v))
    seqs = scattered_seqs(contexts, bs, num_blocks, random.Random(seed))
    parts, k_deq, v_deq, residuals = quantized_blocks(kv_dtype, k, v, seqs)
    q = torch.randn(len(contexts), H, d, generator=g).to(device=device, dtype=torch.bfloat16)
    meta = build_metadata(seqs, [0] * len(seqs), bs, num_blocks, device)
    mask = attention_mask(meta.q_pos, meta.block_tables.shape[1] * bs)
    gather = paged_attention(q, k_deq, v_deq, meta.block_tables, meta.q_index, meta.out_index, mask)
    reason = kivi_unavailable_reason(device, d, bs) if int4 else \
        triton_unavailable_reason(device, d, parts["k"].dtype)
    if reason is None and int4:
        other = paged_int4_decode_attention(q, parts["k"], parts["k_scale"], parts["k_zero"], parts["v"],
                                            parts["v_scale"], parts["v_zero"], *residuals,
                                            torch.arange(len(seqs), device=device), meta.block_tables,
                                            meta.positions[0] + 1)
    elif reason is None:
        other = paged_decode_attention(q, parts["k"], parts["v"], meta.block_tables, meta.positions[0] + 1,
                                       k_scale=parts["k_scale"], v_scale=parts["v_scale"])
    else:
        other = paged_attention_reference(q.float().cpu(), k_deq.float().cpu(), v_deq.float().cpu(),
                                          [s.block_table for s in seqs], [s.end for s in seqs], [1] * len(seqs))
    return (gather.float().cpu() - other.float().cpu()).abs().max().item()


def part_kernel(args, device) -> None:
    with_kernel = triton_unavailable_reason(device, 64) is None
    for kv in ("int8", "fp8", "int4"):
        diff = kernel_vs_gather(kv, device, contexts=(1, 17, 65, 300) if args.quick else
                                (1, 2, 15, 16, 17, 63, 64, 65, 129, 300, 1000, 2049, 4097, 8192))
        report(part="kernel", kv_dtype=kv, compared="triton_vs_gather" if with_kernel else "gather_vs_reference",
               max_abs_diff=diff, ok=diff < 2e-2)


# ---- 2. capacity at a fixed budget ------------------------------------------------------------------


def build_model(args, device, dtype):
    cfg = registry.package("llama3").preset(args.preset)
    if args.quick:
        cfg = registry.package("llama3").preset("tiny")
        cfg.vocab_size, cfg.max_position_embeddings = 512, 1024
    torch.manual_seed(0)
    with torch.device(device):
        model = registry.model_class("llama3")(cfg)
    return model.to(dtype).eval()


def part_capacity(args, model, device) -> None:
    budget = int(args.budget_gib * 2**30)
    base = None
    for kv, bs in (("bf16", 16), ("int8", 16), ("fp8", 16), ("int4", 64)):
        per_block = PagedKVPool.bytes_per_block(model, bs, kv)
        residual = args.seats * PagedKVPool.bytes_per_residual_slot(model, bs, kv)
        num_blocks = (budget - residual) // per_block - 1  # - the scratch block
        engine = LLMEngine(model, EngineConfig(block_size=bs, num_blocks=num_blocks, max_num_seqs=args.seats,
                                               max_num_batched_tokens=max(4096, args.seats), kv_dtype=kv))
        allocated = engine.pool.nbytes()
        # The engine runs on that pool: a few requests through it.
        outs = engine.generate([[1, 2, 3] * 10] * 4, SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
        tokens = num_blocks * bs
        base = base or tokens
        report(part="capacity", kv_dtype=kv, block_size=bs, budget_gib=args.budget_gib, seats=args.seats,
               bytes_per_block=per_block, residual_bytes=residual, num_blocks=num_blocks, tokens=tokens,
               pool_gib=allocated / 2**30, within_budget=allocated <= budget, vs_bf16=tokens / base,
               ran=all(len(o.completions[0]) == 4 for o in outs))
        del engine
        _free(device)


# ---- 3. speed ---------------------------------------------------------------------------------------


def decode_heavy(model, device, kv: str, n: int, prompt_len: int, new: int, graphs: bool) -> dict:
    """Decode tokens/s of n sequences of prompt_len random tokens + `new` new tokens each.

    The prompts are prefilled first, one per step, as requests of one new token that finish at once; their
    full blocks stay in the prefix cache. The same prompts then come back for `new` tokens: admitted
    together, each computes only its last, unfilled block, and every later step is a decode step of all n.
    (Prefilling while others decode would pad each decoding sequence to the prompt's length in the
    gather path's mixed step.) Timed from the third step of that phase on, when the CUDA graph is captured."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (prompt_len,), generator=g).tolist() for _ in range(n)]
    bs = 64 if kv == "int4" else 16
    int4 = kv == "int4"
    engine = LLMEngine(model, EngineConfig(block_size=bs, num_blocks=n * -(-(prompt_len + new) // bs) + 8,
                                           max_num_seqs=max(n, 1), max_num_batched_tokens=max(prompt_len, n),
                                           kv_dtype=kv, cuda_graphs=graphs and not int4))
    sync(device)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True))
    sync(device)
    t1 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
           for p in prompts]
    for _ in range(3):  # admission (the last blocks), then two decode steps: the graph is captured
        engine.step()
    sync(device)
    t2 = time.perf_counter()
    done = engine.stats.decode_tokens
    while engine.has_unfinished():
        engine.step()
    sync(device)
    t3 = time.perf_counter()
    timed = engine.stats.decode_tokens - done
    assert all(len(engine.output(i).completions[0]) == new for i in ids)
    r = dict(prefill_tok_per_s=n * prompt_len / (t1 - t0), decode_tok_per_s=timed / (t3 - t2),
             decode_steps=engine.stats.steps, attention=engine.attention, graphs=engine.graphs is not None)
    del engine
    _free(device)
    return r


def part_speed(args, model, device) -> None:
    cuda = torch.device(device).type == "cuda"
    formats = ("bf16", "int8", "fp8", "int4")
    n, L, new = (2, 40, 4) if args.quick else (args.long_seqs, args.long_len, args.long_new)
    base = None
    for kv in formats:
        try:
            if not args.quick:
                decode_heavy(model, device, kv, 2, 64, 4, graphs=cuda)  # warm-up: kernels compiled, untimed
            r = decode_heavy(model, device, kv, n, L, new, graphs=cuda)
        except Exception as e:
            report(part="speed", workload="decode_heavy", kv_dtype=kv, error=f"{type(e).__name__}: {e}")
            continue
        base = base or r
        report(part="speed", workload="decode_heavy", kv_dtype=kv, seqs=n, prompt_len=L, new_tokens=new, **r,
               decode_speedup_vs_bf16=r["decode_tok_per_s"] / base["decode_tok_per_s"])
    # (b) the same workload at the same KV memory: as many sequences as fit in the bytes that n bf16 ones take
    blocks_per_seq = -(-(L + new) // 16)
    budget = n * blocks_per_seq * PagedKVPool.bytes_per_block(model, 16, "bf16")
    base = None
    for kv in ("bf16", "int8", "fp8"):
        seqs = budget // (blocks_per_seq * PagedKVPool.bytes_per_block(model, 16, kv))
        try:
            r = decode_heavy(model, device, kv, seqs, L, new, graphs=cuda)
        except Exception as e:
            report(part="speed", workload="decode_heavy_same_memory", kv_dtype=kv, error=f"{type(e).__name__}: {e}")
            continue
        base = base or r
        report(part="speed", workload="decode_heavy_same_memory", kv_dtype=kv, seqs=seqs, prompt_len=L,
               new_tokens=new, kv_budget_gib=budget / 2**30, **r,
               decode_speedup_vs_bf16=r["decode_tok_per_s"] / base["decode_tok_per_s"])
    num, lo, hi, new = (3, 8, 24, 4) if args.quick else (64, 32, 512, 256)
    prompts = make_prompts(num, lo, hi, model.config.vocab_size, 0, 0)
    base = None
    for kv in ("bf16", "int8", "fp8"):
        try:
            ecfg = EngineConfig(block_size=16, num_blocks=-(-num * (hi + new) // 16), max_num_seqs=256,
                                max_num_batched_tokens=4096, cuda_graphs=cuda, kv_dtype=kv)
            r = run_paged(model, prompts, [new] * num, device, ecfg)
        except Exception as e:
            report(part="speed", workload="inference.benchmarks.throughput", kv_dtype=kv, error=f"{type(e).__name__}: {e}")
            continue
        tok_s = r["output_tokens"] / r["seconds"]
        base = base or tok_s
        report(part="speed", workload="inference.benchmarks.throughput", kv_dtype=kv, prompts=num, new_tokens=new,
               output_tokens=r["output_tokens"], seconds=r["seconds"], tok_per_s=tok_s, speedup_vs_bf16=tok_s / base,
               attention=r["attention"], graphs=cuda, peak_mem_gib=r["peak_mem_gib"])
        _free(device)


# ---- 4. quality -------------------------------------------------------------------------------------


@torch.no_grad()
def nats_per_token(model, ids: torch.Tensor, kv_dtype: str | None, window: int, chunk: int, batch: int,
                   group_size: int | None = None) -> float:
    """Mean next-token loss over `ids` cut into windows of window + 1 tokens, each fed in chunks of `chunk`
    tokens through a naive cache of `kv_dtype`: every chunk's queries read the earlier chunks' K/V as stored."""
    device = next(model.parameters()).device
    n = (len(ids) - 1) // window
    windows = ids[:n * window + 1].unfold(0, window + 1, window).long()  # (n, window + 1): shared edge tokens
    total, count = 0.0, 0
    for b0 in range(0, n, batch):
        x = windows[b0:b0 + batch].to(device)
        cache = NaiveKVCache.for_model(model, x.shape[0], window, kv_dtype=kv_dtype, group_size=group_size)
        for t in range(0, window, chunk):
            logits = model(x[:, t:t + chunk], cache=cache).float()  # (B, c, V)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, t + 1:t + chunk + 1].flatten(),
                                                       reduction="sum").item()
            count += logits.shape[0] * logits.shape[1]
    return total / count


def part_quality(args, device) -> None:
    from training.data import get_corpus, split_text

    if args.checkpoint:
        from training.tokenizer import Tokenizer

        corpus = get_corpus(args.corpus)
        val = split_text(corpus.text)[1]
        tokenizer = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json")
        ids = torch.tensor(tokenizer.encode(val))
        chars_per_token, name = len(val) / len(ids), corpus.name
        load = lambda dtype: registry.from_pretrained(args.checkpoint, dtype=dtype, device=device)  # noqa: E731
    elif args.quick:  # no checkpoint: a random tiny model on random ids exercises the code
        model = build_model(args, device, torch.float32)
        ids = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
        chars_per_token, name = 1.0, "random_ids"
        load = lambda dtype: model.to(dtype)  # noqa: E731
    else:
        report(part="quality", note="skipped: pass --checkpoint DIR (python -m architectures.llama3.train "
                                    "--preset shakespeare --compile --out DIR)")
        return
    window = 64 if args.quick and not args.checkpoint else None
    results = {}
    for label, dtype, kv, G in (("fp32", torch.float32, None, None), ("bf16", torch.bfloat16, None, None),
                                ("int8", torch.bfloat16, "int8", None), ("fp8", torch.bfloat16, "fp8", None),
                                ("int4", torch.bfloat16, "int4", None), ("int4_g16", torch.bfloat16, "int4", 16)):
        try:
            model = load(dtype)
            w = window or model.config.max_position_embeddings
            nll = nats_per_token(model, ids, kv, w, args.chunk, 32, G)
        except Exception as e:
            report(part="quality", kv_dtype=label, error=f"{type(e).__name__}: {e}")
            continue
        results[label] = npc = nll / chars_per_token
        rel = (npc / results["bf16"] - 1) if "bf16" in results else 0.0
        report(part="quality", kv_dtype=label, model_dtype=str(dtype).removeprefix("torch."), corpus=name,
               window=w, chunk=args.chunk, key_group=G or ("64" if kv == "int4" else "-"), val_tokens=len(ids),
               nats_per_char=npc, rel_vs_bf16=rel)
        _free(device)


# ---- the command line ------------------------------------------------------------------------------


def table() -> None:
    keys = ("part", "workload", "kv_dtype", "max_abs_diff", "tokens", "vs_bf16", "tok_per_s", "decode_tok_per_s",
            "speedup_vs_bf16", "decode_speedup_vs_bf16", "nats_per_char", "rel_vs_bf16", "error", "note")
    cols = [k for k in keys if any(k in r for r in ROWS)]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in ROWS:
        print("| " + " | ".join(_fmt(r[k]) if k in r else "" for k in cols) + " |")


def parse_args(argv) -> tuple:
    """(args, the parts to run), every option checked before any part runs."""
    p = ArgumentParser(prog="python -m inference.benchmarks.quantized_kv", description=__doc__.split("\n\n")[0])
    add_device_option(p)
    p.add_argument("--quick", action="store_true", help="toy sizes and a tiny model: checks the script runs (CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of the parts to run, of {', '.join(PARTS)}")
    p.add_argument("--preset", default="llama-3.2-1b",
                   help=f"llama3 preset of the random model of parts 2 and 3: {', '.join(family_presets('llama3'))}")
    p.add_argument("--budget-gib", type=float, default=4.0, help="part 2: KV memory budget of the pool")
    p.add_argument("--seats", type=int, default=16, help="part 2: max_num_seqs (int4 keeps a residual per seat)")
    p.add_argument("--long-seqs", type=int, default=32, help="part 3: sequences of the decode-heavy workload")
    p.add_argument("--long-len", type=int, default=8192, help="part 3: their prompt length")
    p.add_argument("--long-new", type=int, default=128, help="part 3: new tokens per sequence")
    p.add_argument("--checkpoint", default=None, help="part 4: a checkpoint directory with tokenizer.json")
    p.add_argument("--corpus", default="tinyshakespeare", help="part 4: the corpus whose last 10%% is scored")
    p.add_argument("--chunk", type=int, default=32, help="part 4: tokens fed per forward pass through the cache")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := [part for part in parts if part not in PARTS]:
        raise ValueError(f"unknown part {unknown[0]!r} in --parts {args.parts}; give a comma list of {', '.join(PARTS)}")
    check_preset("llama3", args.preset)
    check_positive("--budget-gib", args.budget_gib)
    check_at_least(("--seats", args.seats, 1), ("--long-seqs", args.long_seqs, 1), ("--long-len", args.long_len, 1),
                   ("--long-new", args.long_new, 1), ("--chunk", args.chunk, 1))
    if args.checkpoint is not None and "quality" in parts:
        from training.data import get_corpus

        check_checkpoint(args.checkpoint, why_tokenizer="part 4 encodes the corpus with the checkpoint's tokenizer")
        get_corpus(args.corpus)  # a corpus that cannot be found fails now, not after parts 1-3
    return args, parts


@command_line
def main(argv=None) -> list[dict]:
    args, parts = parse_args(argv)
    ROWS.clear()
    device = resolve_device(args.device)
    if args.quick:
        args.budget_gib, args.seats = 0.01, 4
    gpu = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "none"
    print(f"bench_quantized_kv where device={device.type} gpu={gpu} torch={torch.__version__} quick={args.quick}",
          flush=True)
    model = None
    for part in parts:
        t0 = time.perf_counter()
        try:
            if part == "kernel":
                part_kernel(args, device)
            elif part in ("capacity", "speed"):
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                model = model or build_model(args, device, dtype)
                (part_capacity if part == "capacity" else part_speed)(args, model, device)
            else:
                model = None
                _free(device)
                part_quality(args, device)
        except Exception as e:  # one part failing must not lose the others
            traceback.print_exc()
            report(part=part, error=f"{type(e).__name__}: {e}")
        print(f"bench_quantized_kv part={part} seconds={time.perf_counter() - t0:.1f}", flush=True)
    table()
    failed = [r for r in ROWS if "error" in r or r.get("ok") is False]
    if failed:  # the measurements that were made are printed above; the command still failed
        print(f"bench_quantized_kv: {len(failed)} failed: " + "; ".join(" ".join(f"{k}={_fmt(v)}" for k, v in r.items()
              if k in ("part", "workload", "kv_dtype", "error", "ok")) for r in failed), file=sys.stderr, flush=True)
        raise SystemExit(1)
    return ROWS


if __name__ == "__main__":
    main()

"""Sliding windows in the paged engine: correctness checks, then decode speed and memory against the same model
with its windows ignored.

    python -m inference.benchmarks.sliding_window            # on a GPU: the checks, then the benchmark
    python -m inference.benchmarks.sliding_window --smoke    # any device, tiny sizes, in seconds

(a) Checks, each printed as a `check` line, and the run stops at the first that fails:
- `kernel`: the Triton decode kernel with a window and a soft-cap against `paged_attention_reference`
  (bf16 and fp32, windows shorter and longer than the contexts, whole and split contexts);
- `tokens`: a small fp32 windowed model (inference/benchmarks/windowed_model.py) generating past 3x its
  window gives the same greedy tokens with no cache, the naive cache, and the paged engine through the
  gather path, the kernel, and the kernel under CUDA graphs (without a GPU: the gather and the reference).
(b) The benchmark: a model with Gemma 3 1B's cache layout (26 layers, 5 local of --window tokens to 1 global,
one KV head of 256, hidden 1152; random weights, bf16), --batch sequences of --context tokens (a prompt, then
--new-tokens generated, EOS ignored) in the paged engine, against the same weights with every window removed
(the outputs then differ: the models differ). Both get the same KV budget (--kv-gib; default: what the
global model needs for the batch). Prints, per model, decode tokens/s (the steps after the last prompt's
prefill), the pool's bytes, the most blocks in use, and how many sequences of --context tokens the budget
holds; then a table of both.
"""

from __future__ import annotations

import time

import torch

from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, resolve_device
from inference.batched import generate_batch
from inference.benchmarks.windowed_model import GEMMA3_PATTERN, WindowedLlama, gemma3_1b_like
from inference.benchmarks.workloads import make_prompts, sync
from inference.engine import EngineConfig, LLMEngine
from inference.kv_pool import PagedKVPool
from inference.memory import paged_kv_bytes
from inference.paged_attention import paged_attention_reference
from inference.sampling import SamplingParams, generate
from inference.step_metadata import ScheduledSeq, build_metadata
from inference.triton_paged_attention import paged_decode_attention, triton_unavailable_reason


def check(name: str, ok: bool, detail: str) -> None:
    print(f"check {name} ok={int(ok)} {detail}")
    if not ok:
        raise SystemExit(f"check {name} failed: {detail}")


def check_kernel(device) -> None:
    """The kernel with windows and soft-caps against the reference, over scattered blocks (bs 16)."""
    g = torch.Generator().manual_seed(0)
    bs, K, H, d, contexts = 16, 2, 8, 64, [1, 15, 16, 17, 100, 333, 700]
    num_blocks = sum(-(-c // bs) for c in contexts) + 3
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-c // bs))] for c in contexts]
    seqs = [ScheduledSeq(t, c - 1, c) for t, c in zip(tables, contexts)]
    meta = build_metadata(seqs, [0] * len(seqs), bs, num_blocks, device)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        k, v = (torch.randn(num_blocks + 1, bs, K, d, generator=g).to(device, dtype) for _ in range(2))
        q = torch.randn(len(seqs), H, d, generator=g).to(device, dtype) * 2
        for window in (None, 1, 16, 50, 512):
            for softcap in (None, 5.0):
                want = paged_attention_reference(q.float(), k.float(), v.float(), tables, contexts, [1] * len(seqs),
                                                 window=window, softcap=softcap)
                for splits in (1, 3, None):
                    got = paged_decode_attention(q, k, v, meta.block_tables, meta.positions[0] + 1, window=window,
                                                 softcap=softcap, splits=splits)
                    err = (got.float() - want).abs().max().item()
                    check("kernel", err <= tol, f"dtype={str(dtype)[6:]} window={window} softcap={softcap} "
                                                f"splits={splits} max_abs_err={err:.2e}")


def tiny_windowed(window: int, softcap: float | None, device) -> WindowedLlama:
    """3 layers (local, global, local), fp32 with spread-out logits (initializer_range 0.2): argmaxes far from ties,
    so every correct path gives the same tokens."""
    torch.manual_seed(0)
    cfg = gemma3_1b_like(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
                         tie_word_embeddings=False)
    return WindowedLlama(cfg, (window, None, window), softcap).to(device).eval()


def engines(device) -> list[tuple[str, dict]]:
    """The paged engine settings the token check runs: what this device can run."""
    if triton_unavailable_reason(device, 16) is None:
        return [("gather", dict(attention="gather")), ("triton", dict(attention="triton")),
                ("triton-graphs", dict(attention="triton", cuda_graphs=True))]
    return [("gather", dict(attention="gather")), ("reference", dict(attention="reference"))]


def check_tokens(device, window: int = 8) -> None:
    """A windowed fp32 model past 3x its window: the same greedy tokens with no cache, the naive cache (alone and
    batched), and every engine this device runs, with prefix caching on and requests arriving mid-run."""
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 97, (12,), generator=g).tolist()
    prompts = [prefix + [1, 2], torch.randint(0, 97, (5,), generator=g).tolist(), [7], prefix + [3]]
    params = SamplingParams(temperature=0.0, max_new_tokens=3 * window + 2)
    for softcap in (None, 4.0):
        model = tiny_windowed(window, softcap, device)
        want = [generate(model, p, params, use_cache=False) for p in prompts]
        got = {"naive": [generate(model, p, params) for p in prompts], "naive-batch": generate_batch(model, prompts, params)}
        for name, settings in engines(device):
            engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, max_num_seqs=8, **settings))
            ids = [engine.add_request(p, params) for p in prompts[:2]]
            for p in prompts[2:]:
                engine.step()
                ids.append(engine.add_request(p, params))
            while engine.has_unfinished():
                engine.step()
            got[name] = [engine.output(i).completions[0] for i in ids]
            check("pool", engine.blocks.num_used == 0, f"engine={name} softcap={softcap} blocks_in_use_after={engine.blocks.num_used}")
        for name, tokens in got.items():
            same = sum(a == b for a, b in zip(tokens, want))
            check("tokens", same == len(want), f"path={name} window={window} softcap={softcap} "
                                               f"same_as_no_cache={same}/{len(want)} tokens_each={params.max_new_tokens}")


# ---- the benchmark ----------------------------------------------------------------------------------------


def decode_run(model, prompts: list[list[int]], new_tokens: int, kv_bytes: int, a, device) -> dict:
    """The engine on the workload with a pool of kv_bytes: decode tokens/s over the steps after every prompt is
    computed and one more (which captures the decode graph), the pool's bytes, and the most blocks in use at once."""
    per_block = PagedKVPool.bytes_per_block(model, a.block_size)
    graphs = device.type == "cuda" and not a.no_graphs
    cfg = EngineConfig(block_size=a.block_size, num_blocks=max(1, kv_bytes // per_block), max_num_seqs=len(prompts),
                       cuda_graphs=graphs, max_model_len=max(map(len, prompts)) + new_tokens)
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    engine = LLMEngine(model, cfg)
    engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))  # warm-up
    engine.reset_prefix_cache()
    ids = [engine.add_request(p, params) for p in prompts]
    most = 0
    while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.scheduler.running):
        engine.step()
        most = max(most, engine.blocks.num_used)
    engine.step()  # the first decode-only step, untimed: it captures the CUDA graph the others replay
    sync(device)
    t0, tokens0 = time.perf_counter(), sum(len(engine.output(i).completions[0]) for i in ids)
    while engine.has_unfinished():
        engine.step()
        most = max(most, engine.blocks.num_used)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(engine.output(i).completions[0]) for i in ids) - tokens0
    return dict(decode_tokens_per_s=tokens / seconds, decode_seconds=seconds, pool_bytes=engine.pool.nbytes(),
                most_blocks=most, most_block_bytes=most * per_block, preemptions=engine.stats.preemptions,
                attention=engine.attention, graphs=graphs)


def benchmark(a, device) -> list[dict]:
    dtype = torch.float32 if a.smoke else torch.bfloat16
    cfg = gemma3_1b_like(**(dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16) if a.smoke else {}),
                         max_position_embeddings=max(a.context + 1, 512))
    torch.manual_seed(0)
    pattern = tuple(a.window if w is not None else None for w in GEMMA3_PATTERN)
    windowed = WindowedLlama(cfg, pattern).to(device, dtype).eval()
    every = WindowedLlama(cfg, (None,)).to(device, dtype).eval()
    every.load_state_dict(windowed.state_dict())  # the same weights, every window removed
    prompts = make_prompts(a.batch, a.context - a.new_tokens, a.context - a.new_tokens, cfg.vocab_size, seed=1)
    stored = a.context - 1  # K/V kept for every token but the last generated one
    need = {name: paged_kv_bytes(m.cache_specs(), [stored], a.block_size, torch.finfo(dtype).bits // 8)
            for name, m in (("windowed", windowed), ("global", every))}
    budget = int(a.kv_gib * 2**30) if a.kv_gib else need["global"] * a.batch
    rows = []
    for name, model in (("windowed", windowed), ("global", every)):
        r = decode_run(model, prompts, a.new_tokens, budget, a, device)
        r.update(model=name, kv_budget_bytes=budget, seq_kv_bytes=need[name], seqs_in_budget=budget // need[name])
        print("bench " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        rows.append(r)
        del model
    return rows


def table(rows: list[dict], a) -> None:
    print(f"\n{a.batch} sequences of {a.context} tokens ({a.context - a.new_tokens} prompt + {a.new_tokens} new), "
          f"window {a.window}, block size {a.block_size}, KV budget {rows[0]['kv_budget_bytes'] / 2**30:.3f} GiB\n")
    print("| model | decode tokens/s | KV bytes of one sequence | sequences the budget holds | most KV in use | "
          "pool bytes | attention |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['decode_tokens_per_s']:.1f} | {r['seq_kv_bytes']:,} | {r['seqs_in_budget']:,} | "
              f"{r['most_block_bytes']:,} | {r['pool_bytes']:,} | "
              f"{r['attention']}{' + CUDA graphs' if r['graphs'] else ''} |")


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m inference.benchmarks.sliding_window", description=__doc__.split("\n")[0])
    add_device_option(p)
    p.add_argument("--smoke", action="store_true", help="tiny model and workload, fp32, for any device (a test runs it)")
    p.add_argument("--batch", type=int, default=None, help="sequences decoded together (default 32; --smoke 3)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence, prompt + new (default 8192; --smoke 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 128; --smoke 8)")
    p.add_argument("--window", type=int, default=None, help="the local layers' window (default 512, Gemma 3's; --smoke 8)")
    p.add_argument("--block-size", type=int, default=16, help="token slots per KV block")
    p.add_argument("--kv-gib", type=float, default=None,
                   help="KV budget of both engines in GiB (default: what the global model needs for the batch)")
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly on a GPU (default: CUDA graphs)")
    p.add_argument("--skip-checks", action="store_true", help="run the benchmark only")
    a = p.parse_args(argv)
    small = dict(batch=3, context=64, new_tokens=8, window=8) if a.smoke else dict(batch=32, context=8192,
                                                                                   new_tokens=128, window=512)
    for name, value in small.items():
        setattr(a, name, value if getattr(a, name) is None else getattr(a, name))
    for name in ("batch", "context", "new_tokens", "window", "block_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.new_tokens >= a.context:
        raise ValueError(f"--new-tokens ({a.new_tokens}) must be below --context ({a.context}): a prompt needs a token")
    device = resolve_device(a.device)
    if not a.skip_checks:
        if triton_unavailable_reason(device, 64) is None:
            check_kernel(device)
        else:
            print(f"check kernel skipped: {triton_unavailable_reason(device, 64)}")
        check_tokens(device)
    rows = benchmark(a, device)
    table(rows, a)
    return rows


if __name__ == "__main__":
    main()

"""One workload through three generators in one process: transformers' `generate` (padded static
batches), our naive batched decoding (inference/batched.py) and our paged engine (inference/engine.py).

    python -m inference.benchmarks.throughput --out runs/bench                       # the default workload (GPU)
    python -m inference.benchmarks.throughput --shared-prefix 256 --out runs/prefix  # prefix caching on vs off
    python -m inference.benchmarks.throughput --device cpu --preset tiny --num-prompts 8 --max-len 64 --new-tokens 16
    python -m inference.benchmarks.throughput --family mixtral --preset tiny --device cpu --max-len 64 --new-tokens 16

Default workload: 64 prompts of random token ids, lengths uniform in [32, 512], 256 new tokens
each, greedy, EOS ignored, a randomly initialised Llama-3.2-1B-shaped model in bf16 on a GPU;
every generator gets the same weights. Unknown `--key value` options override fields of the
preset's config (e.g. --max-position-embeddings 1024 for --preset tiny). The transformers
baseline (hf) exists for --family llama3 only and needs transformers (the test extra); without
it the zoo's engines run alone and a `note:` line on stderr says why hf was left out.
`--kv-dtype int8|fp8|int4|bf16|...` stores the zoo engines' K/V that way (inference/quantized_kv.py);
hf, which keeps its own cache, is then left out of the default engines, and so are CUDA graphs
for int4 (its residual slots are not replayed).

Prints one line per measurement, `bench engine=... key=value ...`: output tokens/s, peak GPU
memory, the KV cache's bytes and utilisation (token slots holding a token some unfinished
sequence needs / slots allocated, averaged over forward passes) and prefill tokens computed.
Writes results.json and PNG plots of utilisation and throughput to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

from architectures import registry
from architectures.utils.config import apply_overrides
from architectures.utils.command_line import ArgumentParser, UserRuntimeError, UserTypeError, command_line
from architectures.llama3.config import to_hf_config
from inference.batched import BatchStats, generate_batch
from inference.command_checks import check_out_dir, check_preset, family_presets, presets_help
from inference.engine import EngineConfig, LLMEngine
from inference.kv_cache import NaiveKVCache
from inference.memory import kv_bytes_per_token
from inference.quantized_kv import valid_kv_dtypes
from inference.benchmarks.workloads import make_prompts, peak_gib, reset_peak, run_paged, sync
from inference.sampling import SamplingParams
from architectures.utils.device import add_device_option, add_dtype_option, compute_dtype, resolve_device


def _padded_util(prompts, steps: int) -> list[float]:
    """Live tokens / allocated slots of transformers' DynamicCache for a left-padded static batch,
    at each forward pass k: it holds longest + k slots per row (it grows by concatenation), of
    which len(prompt) + k are real; every row runs all `steps` passes (EOS ignored)."""
    B, longest, real = len(prompts), max(len(p) for p in prompts), sum(len(p) for p in prompts)
    return [(real + B * k) / (B * (longest + k)) for k in range(steps)]


def _hf_generate(hf, batch: list[list[int]], n: int, device):
    """transformers' `generate` on one left-padded batch, greedy, n new tokens per row."""
    longest = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch], device=device)
    return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


def run_hf(model, prompts, new_tokens: int, batch_size: int, device) -> dict:
    import transformers  # the baseline only: the zoo itself never imports transformers

    with torch.device(device):  # initialised on the device: a 1B model's random init on a CPU takes long
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(to_hf_config(model.config)))
    # assign=True: transformers' modules take our very tensors (the names match), so the weights
    # are the same and are in memory once, and peak memory compares like with like.
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    hf.eval()
    hf.generation_config.eos_token_id = None  # EOS ignored: every row makes exactly new_tokens tokens
    with torch.inference_mode():
        _hf_generate(hf, prompts[:2], 4, device)  # warm-up: kernel selection, allocator
        sync(device), reset_peak(device)
        t0 = time.perf_counter()
        util, prefill = [], 0
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            _hf_generate(hf, batch, new_tokens, device)
            util += _padded_util(batch, new_tokens)
            prefill += len(batch) * max(len(p) for p in batch)
        sync(device)
        seconds = time.perf_counter() - t0
    per_tok = kv_bytes_per_token(model.cache_specs(), next(model.parameters()).element_size())
    kv = max(len(b) * (max(len(p) for p in b) + new_tokens - 1)
             for b in (prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size))) * per_tok
    del hf
    return dict(seconds=seconds, output_tokens=len(prompts) * new_tokens, peak_mem_gib=peak_gib(device),
                kv_gib=kv / 2**30, kv_util=sum(util) / len(util), prefill_tokens=prefill, util_per_step=util)


def run_naive(model, prompts, new_tokens: list[int], device, kv_dtype: str | None = None) -> dict:
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in new_tokens]
    generate_batch(model, prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True),
                   kv_dtype=kv_dtype)
    sync(device), reset_peak(device)
    stats = BatchStats()
    t0 = time.perf_counter()
    outputs = generate_batch(model, prompts, params, stats, kv_dtype)
    sync(device)
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, output_tokens=sum(map(len, outputs)), peak_mem_gib=peak_gib(device),
                kv_gib=stats.kv_bytes / 2**30, kv_util=stats.mean_utilisation, prefill_tokens=stats.prefill_tokens,
                util_per_step=stats.util_per_step, outputs=outputs)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def plot(results: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot([100 * u for u in r["util_per_step"]], label=f"{name} (mean {100 * r['kv_util']:.1f}%)")
    ax.set(xlabel="step", ylabel="KV slots holding live tokens (%)", ylim=(0, 105), title=f"KV utilisation: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kv_utilisation.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    bars = ax.bar(names, [r["tok_per_s"] for r in results.values()])
    ax.bar_label(bars, fmt="%.0f")
    ax.set(ylabel="output tokens / s", title=f"Throughput: {title}")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close("all")


HF_FAMILY = "llama3"  # transformers' LlamaForCausalLM is the one baseline wired up here (run_hf)
DEFAULT_PRESET = "llama-3.2-1b"  # llama3's; another family names its own --preset


def transformers_missing() -> str | None:
    """Why the transformers baseline cannot run here, or None. transformers is the test oracle,
    installed by the test extra only, so a plain `pip install -e .` has the zoo's engines alone."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return f'cannot import transformers ({e}); it comes with the test extra: pip install -e ".[test]"'
    return None


def check_workload(args) -> None:
    """Refuse arguments that describe no workload, before a model is built."""
    for flag, value, least in [("--num-prompts", args.num_prompts, 1), ("--min-len", args.min_len, 1),
                               ("--new-tokens", args.new_tokens, 1), ("--shared-prefix", args.shared_prefix, 0),
                               ("--hf-batch", args.hf_batch, 1), ("--block-size", args.block_size, 1),
                               ("--max-batched-tokens", args.max_batched_tokens, 1)]:
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.min_len > args.max_len:
        raise ValueError(f"--min-len {args.min_len} is above --max-len {args.max_len}; prompt lengths are drawn "
                         f"from [--min-len, --max-len]")
    if args.min_new_tokens is not None and not 1 <= args.min_new_tokens <= args.new_tokens:
        raise ValueError(f"--min-new-tokens must be in [1, --new-tokens={args.new_tokens}], got {args.min_new_tokens}")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise ValueError(f"--kv-blocks must be >= 1, got {args.kv_blocks}; leave it out to give the paged pool "
                         f"the slots the naive cache reserves")
    check_out_dir("--out", args.out)
    if args.kv_dtype == "int4" and args.block_size % 2:
        raise ValueError(f"--kv-dtype int4 groups each block's keys (two 4-bit codes a byte): --block-size must be "
                         f"even, got {args.block_size}")


def parse_args(argv) -> tuple:
    """(args, config overrides): the known options, and the --key value pairs left over for the preset."""
    p = ArgumentParser(prog="python -m inference.benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llama3", help=f"architecture family ({', '.join(registry.language_models())})")
    p.add_argument("--preset", default=argparse.SUPPRESS,
                   help=f"the family's preset: the shape of the random model (default: {DEFAULT_PRESET} for llama3; "
                        f"give one for another family). Presets: {presets_help()}")
    add_device_option(p)
    add_dtype_option(p, help="auto: bf16 on cuda, else fp32")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts in the workload")
    p.add_argument("--min-len", type=int, default=32, help="shortest prompt, in tokens (after any shared prefix)")
    p.add_argument("--max-len", type=int, default=512, help="longest prompt, in tokens (after any shared prefix)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens each prompt generates (EOS ignored)")
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="draw each prompt's max_new_tokens uniformly in [this, --new-tokens]: sequences end at "
                        "different times (transformers' generate cannot do that per row, so hf is left out); "
                        "None: every prompt makes --new-tokens")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with (prefix caching)")
    p.add_argument("--engines", default=None,
                   help="comma list of hf, naive, paged, paged-graphs, paged-nocache; None: hf,naive,paged"
                        "[,paged-graphs] (hf for llama3 when transformers is installed); with --min-new-tokens "
                        "naive,paged[,paged-graphs]; with --shared-prefix paged-nocache,paged[,paged-graphs]")
    p.add_argument("--hf-batch", type=int, default=64, help="padded batch size of transformers' generate")
    p.add_argument("--block-size", type=int, default=16, help="token slots per KV block of the paged engines")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="paged pool size; None: the slots the naive cache reserves, so both get the same memory")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="tokens per forward pass of the paged engine (its logits for all of them are materialised)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", *valid_kv_dtypes()],
                   help="how the zoo engines store K/V: quantized int8/fp8 (a scale per token and head) or int4 "
                        "(KIVI, a key group per block), or a plain dtype; auto: the model's dtype. Not hf's cache")
    p.add_argument("--attention", default="auto", choices=["auto", "triton", "gather"],
                   help="paged engines' attention (EngineConfig.attention); auto: the Triton decode kernel on CUDA")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the prompts and their lengths")
    p.add_argument("--out", default=None, help="directory for results.json and the plots")
    args, unknown = p.parse_known_args(argv)
    args.kv_dtype = None if args.kv_dtype == "auto" else args.kv_dtype
    if len(unknown) % 2 or not all(k.startswith("--") for k in unknown[::2]):
        raise ValueError(f"config overrides must be --key value pairs, got {' '.join(unknown)}")
    return args, {k[2:]: v for k, v in zip(unknown[::2], unknown[1::2])}


def model_config(args, overrides: dict):
    """The preset's config with the command line's overrides (a value of the wrong type is the user's error)."""
    registry.require_lm(args.family, "the engine benchmark")
    presets = family_presets(args.family)
    if not hasattr(args, "preset"):
        if DEFAULT_PRESET not in presets:
            raise ValueError(f"--family {args.family} needs a --preset (the default {DEFAULT_PRESET} is llama3's); "
                             f"{args.family}'s presets are {', '.join(presets)}")
        args.preset = DEFAULT_PRESET
    check_preset(args.family, args.preset)
    try:
        cfg = apply_overrides(registry.package(args.family).preset(args.preset), overrides)
    except TypeError as e:  # "--hidden-size expects int, got 'big'": the user's value, not a bug
        raise UserTypeError(str(e)) from e
    return cfg


def check_length(args, cfg) -> None:
    """The longest prompt and its new tokens must fit the model's positions."""
    longest = args.shared_prefix + args.max_len
    if longest + args.new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompts of up to {longest} tokens + {args.new_tokens} new exceed "
                         f"max_position_embeddings={cfg.max_position_embeddings}; pass --max-position-embeddings N")


def choose_engines(args, cuda: bool) -> list[str]:
    """The engines to run, in order: --engines, or the default for the workload; refused here, before any runs."""
    varied = args.min_new_tokens is not None
    known = ("hf", "naive", "paged", "paged-graphs", "paged-nocache")
    if args.engines is None:
        engines = (["paged-nocache", "paged"] if args.shared_prefix else ["naive", "paged"] if varied
                   else ["hf", "naive", "paged"]) + (["paged-graphs"] if cuda else [])
        if "hf" in engines and (args.family != HF_FAMILY or args.kv_dtype):  # no hf baseline of that
            engines.remove("hf")
        elif "hf" in engines and (why := transformers_missing()):
            # The zoo's own engines still run: say in one line what is left out and how to get it.
            print(f"note: leaving out the transformers baseline hf: {why}", file=sys.stderr, flush=True)
            engines.remove("hf")
        if "paged-graphs" in engines and args.kv_dtype == "int4":
            engines.remove("paged-graphs")
    else:
        engines = args.engines.split(",")
    bad = [e for e in engines if e not in known]
    if bad:
        raise ValueError(f"unknown engine {bad[0]!r} in --engines {args.engines}; choose from {', '.join(known)}")
    if "paged-graphs" in engines and not cuda:
        raise ValueError("paged-graphs needs --device cuda (CUDA graphs)")
    if "paged-graphs" in engines and args.kv_dtype == "int4":
        raise ValueError("--kv-dtype int4 runs without CUDA graphs (they do not replay its residual slots); leave "
                         "paged-graphs out of --engines, or use --kv-dtype int8")
    if args.attention == "triton" and not cuda:  # refused now, not after the other engines have run
        raise ValueError("--attention triton runs on CUDA only; use --attention gather (or auto) on the CPU")
    if "hf" in engines:
        if args.kv_dtype:
            raise ValueError(f"--kv-dtype {args.kv_dtype} sets the zoo engines' cache; the transformers baseline hf "
                             f"keeps its own in the model's dtype: leave hf out of --engines")
        if args.family != HF_FAMILY:
            raise ValueError(f"the transformers baseline hf runs Llama 3 only (--family {HF_FAMILY}), not --family "
                             f"{args.family}; leave hf out of --engines")
        if varied:
            raise ValueError("hf cannot stop each row at its own max_new_tokens; leave out --min-new-tokens")
        if why := transformers_missing():
            raise UserRuntimeError(f"--engines hf (the transformers baseline) needs transformers: {why}; "
                                   f"or leave hf out of --engines")
    return engines


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, each one's max_new_tokens): --new-tokens each, or drawn in [--min-new-tokens, --new-tokens]."""
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len, vocab, args.shared_prefix, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    new_tokens = (torch.randint(args.min_new_tokens, args.new_tokens + 1, (len(prompts),), generator=g).tolist()
                  if args.min_new_tokens is not None else [args.new_tokens] * len(prompts))
    return prompts, new_tokens


def run_engine(name: str, model, prompts, new_tokens: list[int], args, device) -> dict:
    """One engine on the workload; the paged pool gets --kv-blocks, or the slots the naive cache reserves."""
    if name == "hf":
        return run_hf(model, prompts, args.new_tokens, args.hf_batch, device)
    if name == "naive":
        return run_naive(model, prompts, new_tokens, device, args.kv_dtype)
    kv_blocks = args.kv_blocks
    if kv_blocks is None:
        kv_blocks = -(-len(prompts) * (args.shared_prefix + args.max_len + args.new_tokens) // args.block_size)
    return run_paged(model, prompts, new_tokens, device, engine_config(name, args, len(prompts), kv_blocks))


def engine_config(name: str, args, num_prompts: int, num_blocks: int) -> EngineConfig:
    return EngineConfig(block_size=args.block_size, num_blocks=num_blocks, max_num_seqs=max(256, num_prompts),
                        max_num_batched_tokens=max(args.max_batched_tokens, max(256, num_prompts)),
                        enable_prefix_caching=name != "paged-nocache", cuda_graphs=name == "paged-graphs",
                        attention=args.attention, kv_dtype=args.kv_dtype)


def check_kv_dtype(args, model, engines: list[str]) -> None:
    """With --kv-dtype, build each zoo engine's cache once, tiny, before any engine runs: a combination it cannot
    run (fp8 where torch lacks it, int4 on an odd head width, the Triton kernel on a format it cannot read)
    fails here, with the engine's own message, and not after the engines before it have run."""
    if args.kv_dtype is None:
        return
    with contextlib.redirect_stderr(io.StringIO()):  # the engines' notes are printed when they run
        for name in engines:
            if name == "naive":
                NaiveKVCache.for_model(model, 1, 2, kv_dtype=args.kv_dtype)
            elif name != "hf":
                LLMEngine(model, engine_config(name, args, 1, num_blocks=2))


def bench_line(name: str, results: dict, where: str) -> str:
    """The `bench engine=...` line of engine `name`, compared with the engines before it in `results`."""
    r = results[name]
    # The baseline ran in this same process, on the same weights and prompts.
    extra = f" speedup_vs_hf={r['tok_per_s'] / results['hf']['tok_per_s']:.2f}" if "hf" in results and name != "hf" else ""
    if "outputs" in r and "naive" in results and name != "naive":
        pairs = list(zip(r["outputs"], results["naive"]["outputs"]))
        same = sum(a == b for a, b in pairs) / len(pairs)
        # In bf16 two correct engines drift apart: another summation order moves a logit by ~1e-2,
        # a random-init model's near-flat logits then flip an argmax, and the texts differ from
        # there on. same_prefix_as_naive (share of each completion before its first differing
        # token) shows how soon; in fp32 the engines agree exactly (notes/paged-attention.md).
        prefix = sum(_common_prefix(a, b) / max(len(a), 1) for a, b in pairs) / len(pairs)
        extra += f" same_tokens_as_naive={same:.3f} same_prefix_as_naive={prefix:.3f}"
    for k in ("attention", "cached_prompt_tokens", "preemptions", "steps"):
        if k in r:
            extra += f" {k}={r[k]}"
    return (f"bench engine={name} {where} output_tokens={r['output_tokens']} seconds={r['seconds']:.3f} "
            f"tok_per_s={r['tok_per_s']:.1f} peak_mem_gib={r['peak_mem_gib']:.3f} kv_gib={r['kv_gib']:.3f} "
            f"kv_util={r['kv_util']:.4f} prefill_tokens={r['prefill_tokens']}{extra}")


def save(results: dict, out: Path, where: str, title: str) -> None:
    """results.json (without the generated tokens) and the plots, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in results.items()}
    (out / "results.json").write_text(json.dumps({"where": where, "results": slim}, indent=1))
    try:
        plot(results, out, title)
    except ImportError as e:  # the measurements above and results.json are what matter
        print(f"no plots: {e}; pip install matplotlib, or plot results.json yourself")


@command_line
def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    check_workload(args)
    cfg = model_config(args, overrides)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    check_length(args, cfg)
    cuda = device.type == "cuda"
    engines = choose_engines(args, cuda)

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = registry.model_class(args.family)(cfg)
    model = model.to(dtype).eval()
    check_kv_dtype(args, model, engines)
    prompts, new_tokens = workload(args, cfg.vocab_size)
    gpu = torch.cuda.get_device_name(device).replace(" ", "_") if cuda else "none"
    varied = args.min_new_tokens is not None
    where = (f"family={args.family} preset={args.preset} device={device.type} gpu={gpu} torch={torch.__version__} "
             f"dtype={str(dtype).removeprefix('torch.')} "
             f"prompts={len(prompts)} len={args.min_len}-{args.max_len} shared_prefix={args.shared_prefix} "
             f"new_tokens={f'{args.min_new_tokens}-' if varied else ''}{args.new_tokens}"
             + (f" kv_dtype={args.kv_dtype}" if args.kv_dtype else ""))

    results: dict[str, dict] = {}
    for name in engines:
        r = run_engine(name, model, prompts, new_tokens, args, device)
        r["tok_per_s"] = r["output_tokens"] / r["seconds"]
        results[name] = r
        print(bench_line(name, results, where), flush=True)
    if args.out:
        save(results, Path(args.out), where, f"{args.preset} {str(dtype).removeprefix('torch.')}, {len(prompts)} "
                                             f"prompts, {gpu if cuda else 'cpu'}")
    return results


if __name__ == "__main__":
    main()

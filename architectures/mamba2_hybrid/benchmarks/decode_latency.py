"""Per-token decoding latency against context length: pure Mamba-2 stays flat, Llama 3 grows.

    python -m architectures.mamba2_hybrid.benchmarks.decode_latency --figure notes/figures/mamba2-decode-latency-h100.png
    python -m architectures.mamba2_hybrid.benchmarks.decode_latency --device cpu --size tiny --contexts 64,256   # seconds

Why: a Mamba-2 layer decodes from its fixed-size state (conv window + SSM state, `StateSpec`), so a
step's work does not depend on how many tokens came before; an attention layer reads every cached
key and value, so its step grows linearly with the context. Two models of about the same size:
  mamba2   state-spaces/mamba2-130m's shape: 24 Mamba-2 layers, D 768, 24 heads of 64, N 128
  llama3   Llama 3 with the same width and vocabulary, GQA 12/4 heads of 64, SwiGLU 2048, 14 layers
           (the depth that brings it within a few % of the Mamba's parameters; both print their count)
Each step is one token per sequence through `NaiveKVCache` (the zoo's generate path), bf16, captured in
a CUDA graph on a GPU (eager Python launches ~15 ms of kernels one by one for these small models, which
would hide both the growth and the flatness; measured on an H100 with --no-cuda-graphs).
The cache is not filled by a prefill: Llama's slots 0 .. context-1 hold random K/V and the Mamba
states random numbers, since a step costs the same whatever the values, and setting up 32k-token
contexts by prefill would take longer than the measurement. Per (model, batch, context): an untimed
step (or graph replay), then --steps steps from the same context (the cache is rewound), --rounds times, the models
taking turns; the median is reported as `bench model=... batch=... context=... ms_per_token=...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from architectures.utils.command_line import ArgumentParser, command_line
from architectures.llama3 import Llama3, LlamaConfig
from architectures.mamba2_hybrid.config import Mamba2HybridConfig
from architectures.mamba2_hybrid.model import Mamba2Hybrid
from inference.kv_cache import NaiveKVCache
from architectures.utils.device import add_device_option, device_label, resolve_device

SIZES = {
    # ~129M parameters each (the embedding, tied, included)
    "130m": dict(mamba=dict(model_type="mamba2", vocab_size=50288, hidden_size=768, num_hidden_layers=24,
                            hybrid_override_pattern="M" * 24, mamba_num_heads=24, mamba_head_dim=64,
                            ssm_state_size=128, n_groups=1, chunk_size=256, time_step_limit=[0.0, float("inf")],
                            gated_norm_per_group=False, tie_word_embeddings=True, max_position_embeddings=1 << 20),
                 llama=dict(vocab_size=50288, hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                            num_key_value_heads=4, intermediate_size=2048, tie_word_embeddings=True)),
    # CPU smoke size
    "tiny": dict(mamba=dict(model_type="mamba2", vocab_size=256, hidden_size=64, num_hidden_layers=4,
                            hybrid_override_pattern="MMMM", mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16,
                            chunk_size=32, gated_norm_per_group=False, tie_word_embeddings=True,
                            max_position_embeddings=1 << 20),
                 llama=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=True)),
}


def build(size: str, max_context: int, device, dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    spec = SIZES[size]
    with torch.device(device):
        models = {"mamba2": Mamba2Hybrid(Mamba2HybridConfig(**spec["mamba"])),
                  "llama3": Llama3(LlamaConfig(**spec["llama"], max_position_embeddings=max_context))}
    return {name: m.to(dtype).eval() for name, m in models.items()}


def filled_cache(model, batch: int, context: int, steps: int) -> NaiveKVCache:
    """A cache as it would be after `context` tokens: random per-token K/V in the first slots, random states."""
    cache = NaiveKVCache.for_model(model, batch, context + steps)
    for layer in cache.tokens:
        for t in layer.values():
            t[:, :context].normal_()
    for layer in cache.states:
        for t in layer.values():
            t.normal_()
    cache.length = context
    return cache


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_step(model, cache, token):
    return model.compute_logits(model.hidden_states(token, cache)[:, -1]).argmax(-1, keepdim=True)


def seconds_per_step(model, cache, token, context: int, steps: int, device) -> float:
    cache.length = context  # rewind: every round decodes from the same context
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = decode_step(model, cache, token)
    sync(device)
    return (time.perf_counter() - start) / steps


def captured_step(model, cache, token, context: int) -> torch.cuda.CUDAGraph:
    """One decode step at `context` captured in a CUDA graph: each replay repeats that step (same slot, same
    context), so its time is the GPU's per-token time without Python's kernel launches. The model skips its
    host-side token check while a graph is captured (inference/cuda_graphs.py relies on the same)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a first run off the capture stream, as CUDA graph capture wants
        cache.length = context
        decode_step(model, cache, token)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    cache.length = context
    with torch.cuda.graph(graph):
        decode_step(model, cache, token)
    return graph


def seconds_per_replay(graph: torch.cuda.CUDAGraph, steps: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    sync(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def measure(models, batch: int, context: int, steps: int, rounds: int, device, graphs: bool) -> dict[str, float]:
    caches = {name: filled_cache(m, batch, context, steps) for name, m in models.items()}
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    captured = {name: captured_step(m, caches[name], token, context) for name, m in models.items()} if graphs else {}
    times = {name: [] for name in models}
    for r in range(1 + rounds):  # round 0 is untimed: kernels picked, memory touched
        for name, m in models.items():
            s = (seconds_per_replay(captured[name], steps, device) if graphs
                 else seconds_per_step(m, caches[name], token, context, steps, device))
            if r:
                times[name].append(s)
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}_cache_bytes": caches[name].nbytes() for name in models}


def plot(results: list[dict], path: Path, where: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for model, style in (("mamba2", "o-"), ("llama3", "s-")):
            rows = [r for r in results if r["batch"] == batch and r["model"] == model]
            ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], style,
                    label=f"{model} ({rows[0]['parameters'] / 1e6:.0f}M)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"batch {batch}")
        ax.legend()
    how = "CUDA graph replays" if results[0]["cuda_graphs"] else "eager"
    fig.suptitle(f"decode latency per step, bf16, {how}, {where}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m architectures.mamba2_hybrid.benchmarks.decode_latency", description=__doc__.split("\n\n")[0])
    add_device_option(p)
    p.add_argument("--size", choices=sorted(SIZES), default="130m", help="the two models' shapes")
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768", help="comma list of context lengths")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="time replays of a captured decode step (default on CUDA): the GPU's time per token, "
                        "without Python's launch overhead, which dominates small models' eager steps")
    p.add_argument("--out", default=None, help="write results.json here (a folder)")
    p.add_argument("--figure", default=None, help="write the plot here (a .png path)")
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for flag, values in (("--contexts", contexts), ("--batches", batches), ("--steps", [args.steps]),
                         ("--rounds", [args.rounds])):
        if min(values) < 1:
            raise ValueError(f"{flag} must be >= 1, got {min(values)}")
    device = resolve_device(args.device)
    graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    if graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}; pass --no-cuda-graphs")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = build(args.size, max(contexts) + args.steps, device, dtype)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    where = device_label(device)
    print(f"bench_models {' '.join(f'{n}_parameters={c}' for n, c in params.items())} device={where.replace(' ', '_')}")
    results = []
    for batch in batches:
        for context in contexts:
            t = measure(models, batch, context, args.steps, args.rounds, device, graphs)
            for name in models:
                r = dict(model=name, batch=batch, context=context, cuda_graphs=graphs, ms_per_token=t[name] * 1e3,
                         cache_mb=t[f"{name}_cache_bytes"] / 1e6, parameters=params[name])
                print("bench " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.items()), flush=True)
                results.append(r)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(dict(device=where, results=results), indent=1))
    if args.figure:
        plot(results, Path(args.figure), where)
    return results


if __name__ == "__main__":
    main()

"""Experiment: what local (sliding-window) layers save, drawn for notes/gemma.md.

    python -m architectures.gemma.experiments.local_global --out runs/gemma-local-global

Three figures, every number computed from the zoo's own objects, not typed in:
1. gemma-masks.png: which keys each query sees in a local layer (window W) and in a global one,
   from `sliding_window_mask` (architectures/common/attention.py, the mask the model uses), beside
   the layer pattern of each preset (`GemmaConfig.layer_types`).
2. gemma-kv-bytes.png: KV-cache bytes of one sequence against its length, for the published presets,
   as declared by each layer's `KVSpec` (num_kv_heads, head_dim, window) of a model built on the
   meta device: a local layer needs only its last `window` tokens, a global layer all of them.
   Beside it, the same model with every layer global.
3. gemma-softcap.png: c * tanh(s / c) against s, and its derivative 1 - tanh(s / c)^2, the factor
   soft-capping multiplies every gradient by, computed with autograd.
Writes the figures and results.json (the bytes at a few lengths) to --out; seconds on a CPU.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from architectures.common.attention import sliding_window_mask
from architectures.common.cache import KVSpec
from architectures.gemma.config import preset
from architectures.gemma.model import Gemma
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.files import atomic_write, atomic_write_json

PRESETS = ("gemma-2-2b", "gemma-3-1b", "gemma-3-27b")
CONTEXTS = (1024, 4096, 8192, 32768, 131072)


def cache_specs(name: str) -> list[KVSpec]:
    """The preset's per-layer cache declarations, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return Gemma(preset(name)).cache_specs()


def kv_bytes(specs: list[KVSpec], context: int, dtype_bytes: int = 2, windows: bool = True) -> int:
    """Bytes of keys and values one sequence of `context` tokens needs: a layer with a window keeps its
    last min(context, window) tokens, a global layer all of them. windows=False: every layer global."""
    total = 0
    for s in specs:
        per_token = s.num_kv_heads * (s.head_dim + (s.v_head_dim or s.head_dim)) * dtype_bytes  # K and V
        kept = min(context, s.window) if windows and s.window is not None else context
        total += per_token * kept
    return total


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_masks(path: Path, T: int = 24, window: int = 6) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax, (title, w) in zip(axes, [(f"local layer: window {window}", window), ("global layer", None)]):
        ax.imshow(sliding_window_mask(T, w).numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    rows = [(name, preset(name).layer_types) for name in PRESETS]
    width = max(len(types) for _, types in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for r, (_, types) in enumerate(rows):
        grid[r, :len(types)] = torch.tensor([t == "full_attention" for t in types], dtype=torch.float)
    axes[2].imshow(grid.numpy(), cmap="coolwarm", aspect="auto", vmin=0, vmax=1)
    axes[2].set_yticks(range(len(rows)), [f"{n} ({sum(t == 'full_attention' for t in ty)} global / {len(ty)})"
                                          for n, ty in rows])
    axes[2].set_xlabel("layer (red: global, blue: local)")
    axes[2].set_title("layer patterns of the presets")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_kv_bytes(path: Path, specs: dict[str, list[KVSpec]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [2 ** k for k in range(8, 18)]  # 256 .. 131,072 tokens
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (name, s), color in zip(specs.items(), ("tab:green", "tab:blue", "tab:red")):
        limit = preset(name).max_position_embeddings
        xs = [n for n in lengths if n <= limit]
        ax.plot(xs, [kv_bytes(s, n) / 2 ** 30 for n in xs], color=color, label=f"{name}: local + global")
        ax.plot(xs, [kv_bytes(s, n, windows=False) / 2 ** 30 for n in xs], color=color, ls="--",
                label=f"{name}: every layer global")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the sequence")
    ax.set_ylabel("KV cache of one sequence (GiB, bf16)")
    ax.set_title("KV bytes a cache must keep: local layers stop growing at their window")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def softcap_curves(cap: float, lo: float = -150.0, hi: float = 150.0, n: int = 601):
    """s, c * tanh(s / c) and its derivative by autograd, for s in [lo, hi]."""
    s = torch.linspace(lo, hi, n, dtype=torch.float64, requires_grad=True)
    capped = cap * torch.tanh(s / cap)
    (grad,) = torch.autograd.grad(capped.sum(), s)
    return s.detach(), capped.detach(), grad


def plot_softcap(path: Path, caps=(50.0, 30.0)) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for cap, color in zip(caps, ("tab:blue", "tab:orange")):
        s, capped, grad = softcap_curves(cap)
        a.plot(s, capped, color=color, label=f"c = {cap:g}")
        b.plot(s, grad, color=color, label=f"c = {cap:g}")
    a.plot(s, s, color="grey", ls=":", label="no cap")
    a.set_ylim(-160, 160)
    a.set_title("soft-capped score c tanh(s / c)")
    b.set_title("its gradient 1 - tanh(s / c)^2 (autograd)")
    for ax in (a, b):
        ax.set_xlabel("score or logit s")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


@command_line
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m architectures.gemma.experiments.local_global",
                       description="Draw the local/global attention figures of notes/gemma.md")
    p.add_argument("--out", type=Path, default=Path("runs/gemma-local-global"),
                   help="folder for results.json and the three figures")
    args = p.parse_args(argv)
    start = time.perf_counter()
    specs = {name: cache_specs(name) for name in PRESETS}
    results = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "bytes": {}}
    for name, s in specs.items():
        limit = preset(name).max_position_embeddings
        results["bytes"][name] = {n: {"local_global": kv_bytes(s, n), "all_global": kv_bytes(s, n, windows=False)}
                                  for n in CONTEXTS if n <= limit}
    args.out.mkdir(parents=True, exist_ok=True)
    plot_masks(args.out / "gemma-masks.png")
    plot_kv_bytes(args.out / "gemma-kv-bytes.png", specs)
    plot_softcap(args.out / "gemma-softcap.png")
    results["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out / "results.json", results)
    for name, by_len in results["bytes"].items():
        for n, b in by_len.items():
            print(f"{name} {n:>7,} tokens: {b['local_global']:>15,} bytes with local layers, "
                  f"{b['all_global']:>15,} with every layer global ({b['all_global'] / b['local_global']:.2f}x)")
    print(f"figures in {args.out} ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()

"""The drawings of fundamentals/experiments/concept_figures.py, one function per figure.

Each `draw_*` takes the .png path to write. Boxes and arrows are drawn with matplotlib patches on
axes whose units are the diagram's own; `_box` and `_arrow` are the two shapes everything uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from architectures.common.rope import default_inverse_frequencies
from fundamentals.attention import causal_mask, sliding_window_mask

BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#4C72B0", "#DD8452", "#55A868", "#BBBBBB", "#C44E52", "#8172B3"


def _figure(width: float, height: float, columns: int = 1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, columns, figsize=(width, height))
    return plt, fig, axes


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _canvas(ax, width: float, height: float, title: str) -> None:
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10)


def _box(ax, x, y, w, h, text="", color=GREY, fontsize=8, alpha=0.9):
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", linewidth=0.8, alpha=alpha))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, color="black", text="", fontsize=7):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color=color, lw=1))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, text, fontsize=fontsize, ha="center",
                va="bottom", color=color)


def draw_masks(path: Path, T: int = 10, window: int = 4) -> None:
    """fundamentals.attention's causal and sliding-window masks: which keys each query sees."""
    plt, fig, axes = _figure(8, 4, 2)
    for ax, mask, title in ((axes[0], causal_mask(T), "causal: query t sees keys s <= t"),
                            (axes[1], sliding_window_mask(T, window), f"sliding window {window}: t - {window} < s <= t")):
        ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1.4)
        ax.set(title=title, xlabel="key position s", ylabel="query position t", xticks=range(T), yticks=range(T))
        for t in range(T):
            for s in range(T):
                ax.text(s, t, "" if mask[t, s] else "-inf", ha="center", va="center", fontsize=6, color="grey")
    _save(plt, fig, path)


def draw_gqa(path: Path, H: int = 8) -> None:
    """Which key/value head each query head reads: multi-head, grouped-query (K = 2), multi-query."""
    plt, fig, ax = _figure(10, 2.6)
    _canvas(ax, 3 * (H + 2), 6.2, f"query heads (top) and the key/value head each one reads (bottom), H = {H}")
    for column, (K, name) in enumerate(((H, f"multi-head: K = {H}"), (2, "grouped-query: K = 2 (groups of 4, as Llama 3 8B's 32 and 8)"),
                                        (1, "multi-query: K = 1"))):
        x0 = column * (H + 2)
        ax.text(x0 + H / 2, 5.6, name, ha="center", fontsize=9)
        colors = [BLUE, ORANGE, GREEN, PURPLE, RED, GREY, "#937860", "#DA8BC3"]
        for h in range(H):
            _box(ax, x0 + h, 4, 0.8, 0.8, f"q{h}", colors[h // (H // K)] if K < H else colors[h], fontsize=6)
            g = h // (H // K)  # the group of query head h: the K/V head it reads
            kx = x0 + (g + 0.5) * H / K - 0.4
            _arrow(ax, (x0 + h + 0.4, 4), (kx + 0.4, 2.05))
        for g in range(K):
            kx = x0 + (g + 0.5) * H / K - 0.4
            _box(ax, kx, 1.2, 0.8, 0.8, f"k{g}\nv{g}", colors[g], fontsize=6)
        ax.text(x0 + H / 2, 0.4, f"KV cache: {K}/{H} of multi-head's", ha="center", fontsize=8)
    _save(plt, fig, path)


def draw_rope(path: Path, d: int = 16, base: float = 10000.0) -> None:
    """RoPE turns each pair of channels by position x frequency: fast pairs spin, slow pairs barely move."""
    inv_freq = default_inverse_frequencies(d, base)  # (d/2,): the zoo's theta_i = base^(-2i/d)
    plt, fig, axes = _figure(11, 3.8, 3)
    for ax, i in zip(axes[:2], (0, d // 8)):
        for m in range(8):
            angle = m * inv_freq[i].item()
            ax.annotate("", xy=(math.cos(angle), math.sin(angle)), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color=plt.cm.viridis(m / 8)))
            ax.text(1.12 * math.cos(angle), 1.12 * math.sin(angle), f"m={m}", fontsize=6, ha="center")
        ax.set(xlim=(-1.35, 1.35), ylim=(-1.35, 1.35), aspect="equal")
        ax.set_title(f"channel pair {i}: {inv_freq[i].item():.3g} rad per position, m = 0..7", fontsize=9)
        ax.axis("off")
    ax = axes[2]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def rotate(x, m):
        angles = m * inv_freq
        a, b = x[: d // 2], x[d // 2:]  # the half-split layout: channel i pairs with i + d/2
        return torch.cat([a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()])

    for m, style in ((0, "-"), (20, "--")):
        scores = [rotate(q, m + r) @ rotate(k, m) for r in range(40)]
        ax.plot(range(40), scores, style, label=f"key at position {m}")
    ax.set_title("q . k depends only on the distance", fontsize=9)
    ax.set( xlabel="query position - key position", ylabel="score")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def draw_mla(path: Path) -> None:
    """Multi-head latent attention: cache one latent per token; absorb W_UK into the query, W_UV after."""
    plt, fig, axes = _figure(12, 4.4, 2)
    ax = axes[0]
    _canvas(ax, 10, 7, "compression: what the cache holds per token")
    _box(ax, 0.2, 3, 1.6, 1, "x_t (D)", GREY)
    _box(ax, 3, 4.3, 2, 1, "c_t (d_c = 512)\nkv_a_proj + norm", ORANGE)
    _box(ax, 3, 1.7, 2, 1, "k^R_t (64)\nshared, RoPE", ORANGE)
    _arrow(ax, (1.8, 3.6), (3, 4.8), text="W_DKV")
    _arrow(ax, (1.8, 3.4), (3, 2.2), text="W_KR")
    _box(ax, 6.6, 5.2, 3.2, 0.9, "k^C_t,i = W_UK,i c_t  (per head)", BLUE)
    _box(ax, 6.6, 3.9, 3.2, 0.9, "v_t,i = W_UV,i c_t  (per head)", GREEN)
    _arrow(ax, (5, 4.9), (6.6, 5.6))
    _arrow(ax, (5, 4.7), (6.6, 4.3))
    ax.text(4, 0.6, "cached: 512 + 64 = 576 numbers per token per layer\n"
            "(DeepSeek-V3 without the latent: 128 heads x (192 + 128) for K and V)", ha="center", fontsize=7)
    ax = axes[1]
    _canvas(ax, 10, 7, "absorption: attend in the latent space, never build K or V")
    _box(ax, 0.2, 4.4, 2.2, 1, "q^C_t,i (d_h)", BLUE)
    _box(ax, 3.2, 4.4, 2.6, 1, "W_UK,i^T q^C_t,i (d_c)", BLUE)
    _arrow(ax, (2.4, 4.9), (3.2, 4.9))
    _box(ax, 3.2, 2.6, 2.6, 1, "[c_s ; k^R_s] from cache", ORANGE)
    _box(ax, 6.6, 3.5, 3.2, 1, "softmax(q~ . [c; k^R]) c_s\n= latent output (d_c)", PURPLE)
    _arrow(ax, (5.8, 4.9), (6.6, 4.2))
    _arrow(ax, (5.8, 3.1), (6.6, 3.8))
    _box(ax, 6.6, 1.4, 3.2, 1, "W_UV,i (latent output)\n= head i's output", GREEN)
    _arrow(ax, (8.2, 3.5), (8.2, 2.4))
    ax.text(5, 0.5, "q . (W_UK c) = (W_UK^T q) . c:  every head reads the same 576-wide rows", ha="center", fontsize=7)
    _save(plt, fig, path)


def draw_paged_blocks(path: Path) -> None:
    """Two sequences whose block tables share a prefix block, and copy-on-write when one appends."""
    plt, fig, axes = _figure(12, 4, 2)
    for ax, after in zip(axes, (False, True)):
        _canvas(ax, 12, 7, "after fork: both tables hold blocks 1 and 3 (refcount 2)" if not after
                else "seq B writes into shared block 3: copy-on-write copies it to 5")
        for b in range(7):  # the pool of physical blocks
            used = {1: BLUE, 3: PURPLE, 5: ORANGE if after else None}.get(b)
            _box(ax, 5 + b, 1, 0.9, 0.9, str(b), used or "white")
        ax.text(8.5, 0.45, "physical blocks (the pool)", ha="center", fontsize=8)
        ax.text(8.5, -0.2, "refcounts: block 1: 2, block 3: " + ("1, block 5: 1" if after else "2"), ha="center", fontsize=7)
        tables = {"seq A": [1, 3], "seq B": [1, 5] if after else [1, 3]}
        for row, (name, table) in enumerate(tables.items()):
            y = 5.5 - 2 * row
            ax.text(0.1, y + 0.4, name, fontsize=8)
            for j, block in enumerate(table):
                _box(ax, 1.3 + j, y, 0.9, 0.9, str(block), {1: BLUE, 3: PURPLE, 5: ORANGE}[block], fontsize=7)
                _arrow(ax, (1.75 + j, y), (5.45 + block, 1.95))
            ax.text(3.5, y + 0.4, "block table", fontsize=7)
    _save(plt, fig, path)


def draw_ssd_chunks(path: Path, T: int = 12, Q: int = 4) -> None:
    """SSD's T x T matrix M = L * (C B^T), cut into chunks: dense diagonal blocks, low-rank off-diagonal ones."""
    plt, fig, ax = _figure(5.4, 5)
    image = torch.full((T, T), float("nan"))
    for t in range(T):
        for s in range(t + 1):
            image[t, s] = 1.0 if t // Q == s // Q else 0.45
    ax.imshow(image.numpy(), cmap="viridis", vmin=0, vmax=1.2)
    for c in range(1, T // Q):
        ax.axhline(c * Q - 0.5, color="white", lw=2)
        ax.axvline(c * Q - 0.5, color="white", lw=2)
    for c in range(T // Q):
        ax.text(c * Q + Q / 2 - 0.5, c * Q + Q / 2 - 0.5, "dense\nQ x Q", ha="center", va="center", fontsize=7)
        for r in range(c + 1, T // Q):
            ax.text(c * Q + Q / 2 - 0.5, r * Q + Q / 2 - 0.5, "low rank:\nthrough the\nchunk state",
                    ha="center", va="center", fontsize=6, color="white")
    ax.set(title=f"M = L * (C B^T), T = {T}, chunks of Q = {Q}", xlabel="input position s",
           ylabel="output position t", xticks=range(T), yticks=range(T))
    _save(plt, fig, path)


def draw_lora_dora(path: Path) -> None:
    """LoRA adds s B A beside the frozen W; DoRA rescales each output row of the sum to a learned length m."""
    plt, fig, axes = _figure(12, 4, 2)
    ax = axes[0]
    _canvas(ax, 10, 7, "LoRA: y = W x + s B A x,  s = alpha / r")
    _box(ax, 0.3, 3, 1.2, 1, "x (d_in)")
    _box(ax, 3, 4.3, 2.4, 2, "W (frozen)\nd_out x d_in", GREY)
    _box(ax, 2.6, 1.2, 1.6, 1, "A: r x d_in", ORANGE)
    _box(ax, 4.8, 1.2, 1.6, 1, "B: d_out x r\n(zeros at start)", ORANGE, fontsize=7)
    _arrow(ax, (1.5, 3.6), (3, 5.2))
    _arrow(ax, (1.5, 3.3), (2.6, 1.8))
    _arrow(ax, (4.2, 1.7), (4.8, 1.7))
    _box(ax, 7.6, 3, 1.4, 1, "y (d_out)", GREEN)
    _arrow(ax, (5.4, 5.2), (7.6, 3.8))
    _arrow(ax, (6.4, 1.7), (7.6, 3.2), text="x s")
    ax.text(5, 0.3, "trained: r (d_in + d_out) numbers instead of d_in d_out", ha="center", fontsize=7)
    ax = axes[1]
    _canvas(ax, 10, 7, "DoRA: W' = m * (W + s B A) / ||W + s B A||_c")
    for row, length in enumerate((1.0, 0.6, 0.85)):
        y = 5.2 - 1.6 * row
        _box(ax, 0.4, y, 3.2, 0.6, f"row {row} of W + s B A", BLUE, fontsize=7)
        _arrow(ax, (3.7, y + 0.3), (4.7, y + 0.3), text="/ norm")
        _box(ax, 4.8, y, 2.0, 0.6, "unit direction", PURPLE, fontsize=7)
        _arrow(ax, (6.9, y + 0.3), (7.7, y + 0.3), text=f"x m_{row}")
        _box(ax, 7.8, y, 2.0 * length, 0.6, "", GREEN)
    ax.text(5, 0.5, "m: one learned length per output row, initialised to ||W||_c", ha="center", fontsize=7)
    _save(plt, fig, path)


def draw_kivi(path: Path, tokens: int = 10, d: int = 8, G: int = 4) -> None:
    """KIVI's int4 groups: keys per channel over G tokens, values per token; the newest tokens unquantized."""
    plt, fig, axes = _figure(11, 4, 2)
    full = tokens - tokens % G
    for ax, name in zip(axes, ("keys: one scale per channel per group of tokens", "values: one scale per token")):
        ax.set(xlim=(-0.5, tokens - 0.5), ylim=(-0.5, d - 0.5), title=name, xlabel="token",
               ylabel="channel", xticks=range(tokens), yticks=range(d))
        for t in range(tokens):
            for c in range(d):
                if t >= full:
                    color = "white"
                elif name.startswith("keys"):
                    color = plt.cm.tab20((c * 2 + t // G) % 20)  # one group: channel c over G tokens
                else:
                    color = plt.cm.tab20(t % 20)  # one group: all d channels of token t
                _box(ax, t - 0.5, c - 0.5, 1, 1, "", color, alpha=0.8)
        ax.axvline(full - 0.5, color=RED, lw=2)
        ax.text(full + (tokens - full) / 2 - 0.5, d / 2, "residual:\nfull\nprecision", ha="center", va="center",
                fontsize=8, color=RED)
    _save(plt, fig, path)

"""How much memory a KV cache takes, naive (contiguous) and paged.

    python -m inference.memory --preset llama-3.2-1b --seq-len 8192 --batch 32
    python -m inference.memory --preset llama-3.2-1b --seq-len 8192 --batch 32 --mean-len 2048

What a token costs is read from what each layer declares it caches (architectures/common/cache.py),
so the same formulas serve every family. For Llama 3 every token keeps one key and one value
vector per layer and KV head:
    bytes/token = 2 x n_layers x n_kv_heads x head_dim x bytes/element
(grouped-query attention is what makes n_kv_heads small: 8 instead of 32 in Llama 3.2 1B).
The naive cache reserves seq_len slots for every sequence of the batch, however long it turns
out to be; the paged cache holds ceil(length / block_size) blocks per sequence, so it wastes
less than one block per sequence, plus a block table of 4 bytes per block. Layers with a
per-sequence state (Mamba-2: a convolution window and an SSM state) cost a fixed number of
bytes per sequence, whatever its length, beside the per-token bytes of the attention layers:
    python -m inference.memory --family mamba2_hybrid --preset nemotron-h-8b
The formulas are
checked against the bytes of real `NaiveKVCache` and `PagedKVPool` tensors by
tests/inference/test_memory.py; notes/kv-cache.md uses them.

A sliding-window layer (`KVSpec.window`, Gemma 2 and 3) needs only the keys of its last `window` tokens,
and the paged engine gives its older blocks back (inference/kv_groups.py), so the paged lines count, per
layer, the blocks of the whole sequence (global layers) or of its last `window` tokens (windowed ones);
the naive cache still reserves every slot. For Gemma 3 1B (4 global and 22 local layers of one KV head of
256, window 512) one sequence of 32,768 tokens in bf16 holds
    4 x 32768 x 1024 + 22 x 512 x 1024 = 145,752,064 bytes, against 26 x 32768 x 1024 = 872,415,232 if global:
    python -m inference.memory --family gemma --preset gemma-3-1b --seq-len 32768 --batch 1

A model whose layers cache a latent (multi-head latent attention) gets two lines of contrast,
computed for the same layers: its attention with each head's K and V cached decompressed (the
spec its config declares, `decompressed_kv_spec()`), and grouped-query attention with Llama 3
70B's grouping (8 KV heads of 128, read from a Llama 3 layer built with that config):
    python -m inference.memory --family deepseek_v3 --preset deepseek-v3
    61 layers x 576 latent x 2 bytes = 70,272 bytes per token; per head 61 x 128 x (192 + 128) x 2
    = 4,997,120 (71.1x); GQA 2 x 61 x 8 x 128 x 2 = 249,856 (3.6x)

Quantized K/V (`--kv-dtype int8|fp8|int4`) cost their codes plus their scales (and zeros), which
`bytes_per_token` in inference/quantized_kv.py adds up (checked against real caches by
tests/inference/test_quantized_kv.py):
    python -m inference.memory --preset llama-3.2-1b --kv-dtype int8
    int8, fp8: 2 x n_layers x n_kv_heads x (head_dim x 1 + 2) bytes (an fp16 scale per token and head)
    int4 (KIVI, a key group per block of --block-size tokens): codes of head_dim / 2 bytes for K and V,
        V's scale and zero per token and head, K's per channel and block; plus, per sequence, a block of
        full-precision tokens in --dtype (the residual). The naive line is a `NaiveKVCache` whose
        group_size is --block-size.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from architectures import registry
from architectures.common.cache import KVSpec, LatentSpec, bytes_per_sequence, bytes_per_token
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.llama3.config import LlamaConfig
from inference.kv_groups import table_groups
from inference.command_checks import check_at_least, check_preset, default_preset, presets_help
from inference.quantized_kv import PLAIN, QUANTIZED, kv_format, residual_bytes_per_sequence
from inference.quantized_kv import bytes_per_token as quantized_bytes_per_token

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
DEFAULT_PRESET = "llama-3.2-1b"  # of llama3; another family's default is its first published shape

# The attention fields of Llama 3 70B (meta-llama/Meta-Llama-3-70B config.json): 64 query heads of
# 8192 / 64 = 128 channels sharing 8 KV heads; the grouped-query attention a latent cache is set beside.
LLAMA_3_70B_ATTENTION = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8)


def cache_specs(family: str, cfg) -> list:
    """What each layer of a `family` model with config `cfg` caches, read from a model built on the
    meta device (no memory, no initialisation: a 70B config costs nothing)."""
    with torch.device("meta"):
        return registry.model_class(family)(cfg).cache_specs()


def kv_bytes_per_token(specs: list, dtype_bytes: int) -> int:
    """Bytes one cached token costs over all layers (the one formula: `bytes_per_token` of the specs)."""
    return bytes_per_token(specs, dtype_bytes)


def naive_kv_bytes(specs: list, batch: int, capacity: int, dtype_bytes: int) -> int:
    """Every sequence reserves `capacity` slots (the longest prompt + max_new_tokens of the batch)."""
    return batch * capacity * kv_bytes_per_token(specs, dtype_bytes)


def layer_blocks(spec, n: int, block_size: int) -> int:
    """Blocks one layer holds for a sequence of n stored tokens: all ceil(n / bs), or, for a sliding-window
    layer, those holding its last min(n, window) tokens (positions n - window .. n - 1), which is what the
    engine keeps between steps."""
    window = getattr(spec, "window", None)
    if window is None or n <= window:
        return -(-n // block_size)
    return (n - 1) // block_size - (n - window) // block_size + 1


def paged_kv_bytes(specs: list, lengths: list[int], block_size: int, dtype_bytes: int,
                   layer_bytes=None) -> int | float:
    """K/V blocks actually held by sequences of these lengths (the pool itself may be larger), layer by layer:
    a sliding-window layer holds the blocks of its window only. layer_bytes(spec): the bytes a token costs in
    one layer (default: `bytes_per_token` of that layer alone, in dtype_bytes)."""
    layer_bytes = layer_bytes or (lambda spec: bytes_per_token([spec], dtype_bytes))
    return sum(layer_blocks(spec, n, block_size) * block_size * layer_bytes(spec)
               for spec in specs if spec is not None and spec.per_token for n in lengths)


def global_specs(specs: list) -> list:
    """The same layers with every sliding window removed: what the cache would hold if all were global."""
    return [dataclasses.replace(s, window=None) if getattr(s, "window", None) is not None else s for s in specs]


def windowed_layers(specs: list) -> dict[int, int]:
    """{window: number of layers with it}, {} for a model without sliding windows."""
    out: dict[int, int] = {}
    for s in specs:
        if getattr(s, "window", None) is not None:
            out[s.window] = out.get(s.window, 0) + 1
    return out


def block_table_bytes(lengths: list[int], block_size: int, entry_bytes: int = 4) -> int:
    return sum(-(-n // block_size) for n in lengths) * entry_bytes


def describe(specs: list) -> str:
    """The per-token sum in words, grouping equal layers: '2 (K and V) x 16 layers x 8 KV heads x 64 head_dim'."""
    counts: dict = {}
    for spec in specs:
        if spec is not None and spec.per_token:
            counts[spec] = counts.get(spec, 0) + 1
    parts = []
    for spec, n in counts.items():
        if isinstance(spec, KVSpec) and spec.v_head_dim in (None, spec.head_dim):
            window = f" (window {spec.window})" if spec.window is not None else ""
            parts.append(f"2 (K and V) x {n} layers{window} x {spec.num_kv_heads} KV heads x {spec.head_dim} head_dim")
        elif isinstance(spec, KVSpec):
            parts.append(f"{n} layers x {spec.num_kv_heads} KV heads x ({spec.head_dim} K + {spec.v_head_dim} V)")
        else:
            widths = " + ".join(f"{name} {math.prod(shape)}" for name, shape in spec.per_token.items())
            parts.append(f"{n} layers x ({widths}) elements")
    return " + ".join(parts) or "nothing cached per token"


def describe_state(specs: list) -> str:
    """The per-sequence sum in words: '24 layers x (conv 40960 + ssm 1048576) elements', or 'no state'."""
    counts: dict = {}
    for spec in specs:
        if spec is not None and spec.per_sequence:
            counts[spec] = counts.get(spec, 0) + 1
    return " + ".join(f"{n} layers x (" + " + ".join(f"{name} {math.prod(shape)}" for name, shape in
                                                      spec.per_sequence.items()) + ") elements"
                      for spec, n in counts.items()) or "no per-sequence state"


def latent_contrasts(specs: list, cfg) -> dict[str, tuple[str, list]]:
    """For a model whose layers declare a latent cache: {name: (what it is, specs)}, the same model's
    layers with each latent replaced by (a) the per-head K/V its config says the latent stands for,
    if the config declares it (`decompressed_kv_spec()`), and (b) Llama 3 70B's grouped-query K/V.
    {} for a model that caches no latent."""
    if not any(isinstance(s, LatentSpec) for s in specs):
        return {}

    def swap(new) -> list:
        return [new if isinstance(s, LatentSpec) else s for s in specs]

    out = {}
    if hasattr(cfg, "decompressed_kv_spec"):
        out["per_head_kv"] = ("if K and V were cached per head (decompressed)", swap(cfg.decompressed_kv_spec()))
    gqa = cache_specs("llama3", LlamaConfig(**LLAMA_3_70B_ATTENTION, num_hidden_layers=1))[0]
    out["gqa"] = (f"grouped-query attention of the same depth, Llama 3 70B's grouping ({gqa.num_kv_heads} KV heads "
                  f"of {gqa.head_dim})", swap(gqa))
    return out


def _print_windows(specs: list, windows: dict[int, int], a, lengths: list[int], paged: int, nbytes: int) -> None:
    """The lines of a model with sliding-window layers: what they hold, against the same layers all global."""
    every = paged_kv_bytes(global_specs(specs), lengths, a.block_size, nbytes)
    n_global = sum(1 for s in specs if s is not None and s.per_token and getattr(s, "window", None) is None)
    kept = ", ".join(f"{n} layers the blocks of their last {w} tokens" for w, n in sorted(windows.items()))
    print(f"sliding windows: {n_global} global layers keep every block, {kept}: {paged} bytes of K/V for "
          f"{a.batch} sequence(s) of {lengths[0]} tokens, against {every} bytes if every layer were global "
          f"({every / paged:.2f}x)")
    print(f"memory windows preset={a.preset} dtype={a.dtype} batch={a.batch} mean_len={lengths[0]} "
          f"block_size={a.block_size} kv_bytes={paged} global_kv_bytes={every}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


@command_line
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m inference.memory", description=__doc__.split("\n")[0])
    defaults = ", ".join(f"{f} {default_preset(f, DEFAULT_PRESET)}" for f in registry.language_models())
    p.add_argument("--family", default="llama3", help=f"architecture family ({', '.join(registry.language_models())})")
    p.add_argument("--preset", default=argparse.SUPPRESS,  # the default depends on --family: said in the help
                   help=f"the family's preset whose layers are counted (default: {defaults}). Presets: {presets_help()}")
    p.add_argument("--seq-len", type=int, default=8192, help="slots the naive cache reserves per sequence")
    p.add_argument("--batch", type=int, default=32, help="sequences in the batch")
    p.add_argument("--mean-len", type=int, default=None, help="tokens a sequence really holds; None: --seq-len")
    p.add_argument("--block-size", type=int, default=16, help="token slots per block of the paged cache")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="number format of the cached K/V")
    p.add_argument("--kv-dtype", default=None, choices=list(PLAIN) + list(QUANTIZED),
                   help="quantized K/V storage (int8, fp8, int4: scales included); the model computes in --dtype. "
                        "Default: K/V stored in --dtype")
    a = p.parse_args(argv)
    check_at_least(("--seq-len", a.seq_len, 1), ("--batch", a.batch, 1), ("--block-size", a.block_size, 1))
    registry.require_lm(a.family, "inference.memory (the KV memory of a language model)")
    a.preset = getattr(a, "preset", None) or default_preset(a.family, DEFAULT_PRESET)
    check_preset(a.family, a.preset)
    mean = a.mean_len if a.mean_len is not None else a.seq_len
    if not 1 <= mean <= a.seq_len:
        raise ValueError(f"--mean-len must be in [1, --seq-len={a.seq_len}], got {mean}")
    cfg = registry.package(a.family).preset(a.preset)
    specs = cache_specs(a.family, cfg)
    if a.kv_dtype is not None and a.kv_dtype not in QUANTIZED:  # a plain --kv-dtype is --dtype for the cache
        a.dtype, a.kv_dtype = a.kv_dtype, None
    if a.kv_dtype is not None:
        return _quantized(a, specs, mean)
    nbytes = DTYPE_BYTES[a.dtype]
    per_token = kv_bytes_per_token(specs, nbytes)
    per_seq = bytes_per_sequence(specs, nbytes)  # fixed-size state, one per sequence (both caches hold it)
    naive = naive_kv_bytes(specs, a.batch, a.seq_len, nbytes) + a.batch * per_seq
    lengths = [mean] * a.batch
    paged = paged_kv_bytes(specs, lengths, a.block_size, nbytes) + a.batch * per_seq
    tables = block_table_bytes(lengths, a.block_size) * len(table_groups(specs))  # a table per group of layers
    print(f"{a.preset}: {describe(specs)} x {nbytes} bytes ({a.dtype}) = {per_token} bytes = "
          f"{per_token / 1024:.1f} KiB per token")
    contrasts = {}
    for name, (what, other) in latent_contrasts(specs, cfg).items():
        contrasts[name] = kv_bytes_per_token(other, nbytes)
        print(f"  {what}: {describe(other)} x {nbytes} bytes = {contrasts[name]} bytes = "
              f"{contrasts[name] / 1024:.1f} KiB per token, {contrasts[name] / per_token:.1f}x the latent")
    if per_seq:
        print(f"{a.preset}: {describe_state(specs)} x {nbytes} bytes ({a.dtype}) = {per_seq} bytes = "
              f"{per_seq / 2**20:.1f} MiB per sequence, whatever its length")
    state = f" (+ {a.batch} x {per_seq} bytes of state)" if per_seq else ""
    print(f"naive: {a.batch} sequences x {a.seq_len} reserved slots{state} = {_gib(naive)} GiB, "
          f"of which {mean / a.seq_len:.1%} hold tokens")
    windows = windowed_layers(specs)
    held = "" if windows or not per_token else \
        f", {a.batch * mean * per_token / (paged - a.batch * per_seq):.1%} of slots hold tokens"
    print(f"paged: {a.batch} sequences x ceil({mean}/{a.block_size}) blocks x {a.block_size} slots{state} = "
          f"{_gib(paged)} GiB (+ {tables} bytes of block tables){held}")
    if windows:
        _print_windows(specs, windows, a, lengths, paged - a.batch * per_seq, nbytes)
    common = f"preset={a.preset} dtype={a.dtype} batch={a.batch} seq_len={a.seq_len} mean_len={mean} block_size={a.block_size}"
    print(f"memory cache=naive {common} bytes_per_token={per_token} bytes_per_sequence={per_seq} total_bytes={naive} "
          f"total_gib={_gib(naive)}")
    print(f"memory cache=paged {common} bytes_per_token={per_token} bytes_per_sequence={per_seq} "
          f"total_bytes={paged + tables} total_gib={_gib(paged + tables)}")
    for name, n in contrasts.items():
        print(f"memory contrast={name} preset={a.preset} dtype={a.dtype} bytes_per_token={n} "
              f"cached_bytes_per_token={per_token} ratio={n / per_token:.2f}")
    result = {"bytes_per_token": per_token, "bytes_per_sequence": per_seq, "naive_bytes": naive,
              "paged_bytes": paged + tables}
    if contrasts:
        result["contrast_bytes_per_token"] = contrasts
    return result


def quantized_kv_bytes(specs: list, kv_dtype: str, compute: str = "bf16", block_size: int = 16) -> dict:
    """What quantized K/V storage costs: bytes per token (codes, scales and zeros; int4's per-block key scales
    shared by block_size tokens) and, for int4, the full-precision residual each sequence keeps (a block of
    tokens in the `compute` dtype). The arithmetic is `bytes_per_token` of inference/quantized_kv.py."""
    fmt = kv_format(kv_dtype, PLAIN[compute], "cpu", block_size if kv_dtype == "int4" else None)  # a layout only
    per_token = quantized_bytes_per_token(specs, fmt)
    return {"bytes_per_token": int(per_token) if per_token == int(per_token) else per_token,
            "residual_bytes_per_sequence": residual_bytes_per_sequence(specs, fmt), "token_group": fmt.token_group}


def _quantized(a, specs: list, mean: int) -> dict:
    """`main` for a quantized --kv-dtype: the same lines, with scales counted and the plain cost beside."""
    if a.dtype not in PLAIN:
        raise ValueError(f"--dtype {a.dtype} is the dtype the model computes in (and an int4 residual is kept "
                         f"in); with --kv-dtype {a.kv_dtype} give one of {', '.join(PLAIN)}")
    q = quantized_kv_bytes(specs, a.kv_dtype, a.dtype, a.block_size)
    per_token, residual = q["bytes_per_token"], q["residual_bytes_per_sequence"]
    per_seq = bytes_per_sequence(specs, DTYPE_BYTES[a.dtype]) + residual  # state, and int4's residual
    plain = kv_bytes_per_token(specs, DTYPE_BYTES[a.dtype])
    naive = math.ceil(a.batch * a.seq_len * per_token) + a.batch * per_seq
    fmt = kv_format(a.kv_dtype, PLAIN[a.dtype], "cpu", a.block_size if a.kv_dtype == "int4" else None)
    held = paged_kv_bytes(specs, [mean] * a.batch, a.block_size, 0, lambda s: quantized_bytes_per_token([s], fmt))
    paged = math.ceil(held) + a.batch * per_seq
    tables = block_table_bytes([mean] * a.batch, a.block_size)
    how = {"int8": "int8 codes + an fp16 scale per token and KV head",
           "fp8": "fp8 e4m3 codes + an fp16 scale per token and KV head",
           "int4": f"int4 KIVI: packed codes + fp16 scale and zero per token and head (V) and per channel over "
                   f"groups of {q['token_group']} tokens = --block-size (K)"}[a.kv_dtype]
    print(f"{a.preset}: {describe(specs)}, {how} = {per_token} bytes = {per_token / 1024:.2f} KiB per token "
          f"({plain / per_token:.2f}x fewer than {plain} bytes in {a.dtype})")
    if residual:
        print(f"{a.preset}: each sequence keeps its newest tokens, up to {q['token_group']}, in {a.dtype} until their "
              f"group fills: {residual} bytes = {residual / 2**20:.2f} MiB per sequence")
    state = f" (+ {a.batch} x {per_seq} bytes per sequence)" if per_seq else ""
    print(f"naive: {a.batch} sequences x {a.seq_len} reserved slots{state} = {_gib(naive)} GiB")
    print(f"paged: {a.batch} sequences x ceil({mean}/{a.block_size}) blocks x {a.block_size} slots{state} = "
          f"{_gib(paged)} GiB (+ {tables} bytes of block tables)")
    common = (f"preset={a.preset} dtype={a.dtype} kv_dtype={a.kv_dtype} batch={a.batch} seq_len={a.seq_len} "
              f"mean_len={mean} block_size={a.block_size}")
    for cache, total in (("naive", naive), ("paged", paged + tables)):
        print(f"memory cache={cache} {common} bytes_per_token={per_token} bytes_per_sequence={per_seq} "
              f"plain_bytes_per_token={plain} total_bytes={total} total_gib={_gib(total)}")
    return {"bytes_per_token": per_token, "bytes_per_sequence": per_seq, "naive_bytes": naive,
            "paged_bytes": paged + tables, "plain_bytes_per_token": plain}


if __name__ == "__main__":
    main()

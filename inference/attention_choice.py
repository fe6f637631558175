"""Which attention path the paged engine's steps take, decided once when the engine is built.

"triton": decode-only steps read K/V in place with the Triton kernels (inference/triton_paged_attention.py;
int4: inference/triton_kivi_attention.py), on a CUDA device; "gather": every step gathers the blocks it needs
(inference/paged_attention.py), on any device; "reference": the slow oracle the tests compare with; "auto":
"triton" where every layer's cache can be read by a kernel, else "gather". The choice follows what the
layers cache (their cache specs) and how the pool stores it (the block format), never the architecture.
"""

from __future__ import annotations

import torch

from architectures.common.cache import KVSpec, LatentSpec
from inference.triton_kivi_attention import kivi_unavailable_reason
from inference.triton_paged_attention import key_split, triton_unavailable_reason

CHOICES = ("auto", "triton", "gather", "reference")


def choose_attention(choice: str, model, kv_format, device: torch.device, block_size: int) -> str:
    """The attention path for `choice`: "auto" resolved, "triton" refused (with why) where it cannot run."""
    if choice not in CHOICES:
        raise ValueError(f"attention must be one of {', '.join(CHOICES)}, got {choice!r}")
    specs = [s for s in model.cache_specs() if s is not None and s.per_token]
    why_not = next(filter(None, (kernel_unavailable_reason(s, kv_format, device, block_size) for s in specs)), None)
    if choice == "triton" and why_not:
        raise ValueError(f"attention='triton': {why_not}; use attention='gather' (or 'auto')")
    if choice == "auto":
        return "gather" if why_not else "triton"
    return choice


def kernel_unavailable_reason(spec, fmt, device: torch.device, block_size: int) -> str | None:
    """None if the Triton decode kernel can read what this layer caches, stored in format `fmt`, else why not."""
    if not fmt.kernel_reads:
        return (f"the Triton decode kernels read plain caches of the model's dtype, int8/fp8 ones and int4 ones "
                f"of a bf16 model, not kv_dtype={fmt.name!r} with a {fmt.compute_dtype} model")
    if isinstance(spec, KVSpec) and fmt.name == "int4":
        if spec.softcap is not None:
            return "the int4 decode kernel applies no attention soft-cap"
        if (spec.v_head_dim or spec.head_dim) != spec.head_dim:
            return "the int4 decode kernel reads K and V of equal widths only"
        return kivi_unavailable_reason(device, spec.head_dim, block_size)
    if isinstance(spec, KVSpec):
        value = spec.v_head_dim or spec.head_dim
        if fmt.quantized and value != spec.head_dim:
            return "the Triton decode kernel reads quantized K and V of equal widths only"
        return triton_unavailable_reason(device, spec.head_dim, fmt.storage_dtype, value)
    if isinstance(spec, LatentSpec) and spec.value_width is not None:
        if fmt.quantized:
            return f"the Triton decode kernel reads plain latent caches, not kv_dtype={fmt.name!r}"
        split = key_split(spec.width)
        if split is not None and split[0] != spec.value_width:
            return (f"the Triton decode kernel takes a latent's values from its first power-of-2 part ({split[0]} "
                    f"numbers of {spec.width}), and this one declares {spec.value_width}")
        return triton_unavailable_reason(device, spec.width, None, spec.value_width)
    return (f"the Triton decode kernel reads K/V or a latent whose value width is declared, and a layer caches "
            f"{type(spec).__name__}")

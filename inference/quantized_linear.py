"""Weight-only quantization of any zoo model: int8, int4, NF4 or fp8 weights, float activations.

`quantize(model, fmt)` replaces every nn.Linear (but the ones named in `skip`) by a `QuantizedLinear`
that keeps its weight in a format of inference/quantization.py and, on every call, decodes it to
the input's dtype and multiplies as usual: y = x W^T + b with W = dequantize(codes, scales). The
matmul is exactly the float one; what changes is that weights take about a half (int8, fp8) to a
quarter (int4, NF4) of their bf16 bytes, and weight bytes are what bound decoding speed and decide
which models fit on a GPU. (Fast kernels decode inside the matmul instead of building W; this file
is the correct, simple reference for them.) NF4 and double quantization: "QLoRA: Efficient
Finetuning of Quantized LLMs" (Dettmers et al., 2023, arXiv:2305.14314).

Tested (tests/inference/test_quantized_weights.py) against the float model: each layer's output
within the bound its format guarantees, logits within a per-format tolerance, and bit-identical
logits after save and load, for every family of the registry.

`save_quantized` / `load_quantized` store a quantized model as a Hugging Face-style directory:
config.json (the family's, plus a `quantization_config`) and model.safetensors with the quantized
buffers under the model's own module names and the format in the file's metadata. QLoRA-style
fine-tuning reads a base layer's weight through `QuantizedLinear.dequantize_weight()`.

Mixture-of-experts weights stored as 3-D parameters (Mixtral's and DeepSeek-V3's fused
`experts.gate_up_proj` / `experts.down_proj`) are not nn.Linear modules and stay in full
precision; their routers and every attention and dense projection are quantized.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from architectures import registry
from architectures.common.checkpoint import SINGLE_FILE, load_state_dict_strict, materialize, read_config_json
from architectures.utils.files import atomic_write, atomic_write_json
from inference.quantization import (NF4Tensor, WEIGHT_FORMATS, check_format, dequantize_fp8, dequantize_int4,
                                    dequantize_int8, dequantize_nf4, quantize_fp8, quantize_int4, quantize_int8,
                                    quantize_nf4)

# The output head is kept in full precision by default: it is one matrix (so little memory next to
# the blocks), yet it produces the logits directly, and its error is not averaged out by later layers.
# Embeddings are nn.Embedding, not nn.Linear, so they are never touched: a lookup reads one row per
# token, so quantizing it saves memory but no bandwidth per step.
DEFAULT_SKIP = ("lm_head",)
METADATA_KEY = "zoo_quantization"  # safetensors metadata: the format tag of the file's tensors


class QuantizedLinear(nn.Module):
    """A linear layer y = x W^T + b whose W (out_features, in_features) is stored quantized.

    Buffers, for G = in_features // group_size groups per row (group_size None: one group per row):
      int8: qweight int8 (out, in), scale float32 (out, G)
      int4: qweight uint8 (out, in // 2), scale and zero float32 (out, G)
      nf4:  qweight uint8 (out, in // 2), absmax float32 (out, G); with double quantization instead
            absmax_q int8 (out, G), absmax_scale float32 (ceil(out * G / 256),), absmax_offset float32 ()
      fp8:  qweight float8_e4m3fn (out, in), scale float32 (out, G)
    The bias, if any, stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, format: str, group_size: int | None = 64,
                 bias: bool = False, double_quant: bool = False, device=None, dtype=torch.float32,
                 parts: dict[str, torch.Tensor] | None = None):
        """An empty layer of the right shapes (what loading fills), or one holding `parts`;
        `from_linear` quantizes a trained nn.Linear."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = check_format(format, WEIGHT_FORMATS)
        self.group_size = group_size
        if double_quant and format != "nf4":
            raise ValueError(f"double_quant is an NF4 option (QLoRA's); format {format!r} has none")
        self.double_quant = double_quant
        if parts is None:
            # The buffers of an empty layer come from quantizing a zero weight: their shapes and dtypes
            # are then those of the very code that quantizes.
            parts = _quantize_weight(torch.zeros(out_features, in_features, device=device), format, group_size,
                                     double_quant)
        for name, tensor in parts.items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str, group_size: int | None = 64,
                    double_quant: bool = False) -> QuantizedLinear:
        parts = _quantize_weight(linear.weight.detach(), format, group_size, double_quant)
        layer = cls(linear.in_features, linear.out_features, format, group_size, linear.bias is not None,
                    double_quant, device=linear.weight.device, dtype=linear.weight.dtype, parts=parts)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight W (out_features, in_features) that the stored codes stand for."""
        if self.format == "int8":
            return dequantize_int8(self.qweight, self.scale, dtype)
        if self.format == "int4":
            return dequantize_int4(self.qweight, self.scale, self.zero, dtype)
        if self.format == "fp8":
            return dequantize_fp8(self.qweight, self.scale, dtype)
        if self.double_quant:
            t = NF4Tensor(self.qweight, None, self.absmax_q, self.absmax_scale, self.absmax_offset)
        else:
            t = NF4Tensor(self.qweight, self.absmax, None, None, None)
        return dequantize_nf4(t, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode the whole weight on every call: simple and exact, at the cost of one (out, in) temporary.
        if torch.is_grad_enabled() and x.requires_grad:  # training through a frozen base (QLoRA)
            y = _DecodedMatmul.apply(x, self)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)  # (..., in) -> (..., out)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating tensor, and fp8 codes and float32 scales are
        # floating: they would be rounded or decoded. The stored parts follow only the device.
        stored = {n: b for n, b in self._buffers.items() if b is not None}
        for name in stored:
            del self._buffers[name]
        super()._apply(fn, recurse)  # the bias follows the model's dtype, like any parameter
        for name, b in stored.items():
            moved = fn(b)
            self._buffers[name] = moved if moved.dtype == b.dtype else b.to(moved.device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"group_size={self.group_size}{dq}, bias={self.bias is not None}")


class _DecodedMatmul(torch.autograd.Function):
    """y = x W^T with W decoded from a QuantizedLinear's codes, for gradients that flow through the frozen
    layer to its input (QLoRA trains adapters around it). F.linear would keep the decoded W for the
    backward pass, a full-precision copy of every quantized layer alive from forward to backward,
    which is the memory quantizing was meant to save; here the backward decodes W again, from the
    codes. Under autocast, x and W are multiplied in the autocast dtype, as F.linear would be."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        with torch.autocast(kind, enabled=False):
            return F.linear(x.to(dtype), layer.dequantize_weight(dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.dequantize_weight(ctx.dtype)  # (out, in), decoded again
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None  # dL/dx = dL/dy W; the codes get no gradient


def _quantize_weight(w: torch.Tensor, format: str, group_size: int | None,
                     double_quant: bool) -> dict[str, torch.Tensor]:
    """W (out, in) -> the buffers of a QuantizedLinear, by name."""
    if format == "int8":
        q, scale = quantize_int8(w, group_size)
        return {"qweight": q, "scale": scale}
    if format == "int4":
        q, scale, zero = quantize_int4(w, group_size)
        return {"qweight": q, "scale": scale, "zero": zero}
    if format == "fp8":
        q, scale = quantize_fp8(w, group_size)
        return {"qweight": q, "scale": scale}
    if group_size is None:
        raise ValueError("nf4 needs a group size (QLoRA uses 64): one absmax per whole row is too coarse for 16 levels")
    t = quantize_nf4(w, group_size, double_quant)
    if double_quant:
        return {"qweight": t.packed, "absmax_q": t.absmax_q, "absmax_scale": t.absmax_scale,
                "absmax_offset": t.absmax_offset}
    return {"qweight": t.packed, "absmax": t.absmax}


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is skipped when an entry equals its full name or its last part, or matches as a glob."""
    return any(name == p or name.rsplit(".", 1)[-1] == p or fnmatch.fnmatchcase(name, p) for p in skip)


def _linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize(model: nn.Module, fmt: str, group_size: int | None = 64, skip: tuple[str, ...] = DEFAULT_SKIP,
             double_quant: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` not named in `skip` by a QuantizedLinear, in place; returns model.

    fmt: one of WEIGHT_FORMATS. group_size: inputs per scale (None: one per output row; not for nf4).
    skip: module names kept in float (an entry matches the full name, its last part, or as a glob).
    double_quant: NF4's quantized absmaxes (QLoRA). The settings are kept on the model
    (`model.quantization_config`), which `save_quantized` writes out."""
    targets = check_quantizable(model, fmt, group_size, skip, double_quant)
    for name, linear in targets:
        _replace(model, name, QuantizedLinear.from_linear(linear, fmt, group_size, double_quant))
    model.quantization_config = {"format": fmt, "group_size": group_size, "double_quant": double_quant,
                                 "skip": list(skip)}
    return model


def check_quantizable(model: nn.Module, fmt: str, group_size: int | None = 64, skip: tuple[str, ...] = DEFAULT_SKIP,
                      double_quant: bool = False) -> list[tuple[str, nn.Module]]:
    """What `quantize` checks before it replaces any layer, alone: the (name, layer) pairs it would
    quantize, or a ValueError that says why it cannot. The model is not changed."""
    check_format(fmt, WEIGHT_FORMATS)
    if getattr(model, "quantization_config", None) is not None or any(
            isinstance(m, QuantizedLinear) for m in model.modules()):
        done = getattr(model, "quantization_config", None) or {}
        raise ValueError(f"this model is already quantized ({done.get('format', 'QuantizedLinear layers')}); "
                         "quantizing again would quantize the quantization error. Start from the float model")
    if fmt == "nf4" and group_size is None:
        raise ValueError("nf4 needs a group size (QLoRA uses 64): one absmax per whole row is too coarse for 16 levels")
    if fmt != "nf4" and double_quant:
        raise ValueError(f"double_quant is an NF4 option (QLoRA's); format {fmt!r} has none")
    targets = _linears(model, tuple(skip))
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    # Check every layer before replacing any, so an error leaves the model as it was.
    for name, linear in targets:
        if linear.weight.data_ptr() in embeddings:
            raise ValueError(f"layer {name!r} shares its weight with the embedding (tie_word_embeddings); quantizing "
                             f"it would untie the two. Keep it in full precision: add {name!r} to skip")
        n = linear.in_features
        if group_size is not None and (group_size <= 0 or n % group_size):
            raise ValueError(f"group_size={group_size} does not divide in_features={n} of layer {name!r}; "
                             f"pick a size that divides every quantized layer's in_features, or add {name!r} to skip")
        if fmt in ("int4", "nf4") and n % 2:
            raise ValueError(f"{fmt} packs two weights a byte and layer {name!r} has odd in_features={n}")
    return targets


# ---- save and load ----------------------------------------------------------------------------------

def save_quantized(model: nn.Module, directory: str | Path) -> None:
    """Write `directory`/config.json (the family's, plus quantization_config) and model.safetensors
    (the quantized buffers and the float rest, under the model's own tensor names)."""
    qcfg = getattr(model, "quantization_config", None)
    if qcfg is None:
        raise ValueError("this model is not quantized; call quantize(model, fmt) first, or save it with its "
                         "family's save_pretrained")
    directory = Path(directory)
    family = registry.family_of(model)
    # The family writes its own config.json (an empty state: the weights are written below).
    registry.package(family).save_pretrained(model, directory, state_dict={})
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        state.pop("lm_head.weight")  # the tied head is the embedding; rebuilt by tie_weights on load
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(qcfg)}
    atomic_write(directory / SINGLE_FILE, lambda tmp: save_file(state, tmp, metadata=metadata))
    config = read_config_json(directory)
    atomic_write_json(directory / "config.json", {**config, "quantization_config": {"quant_method": "zoo", **qcfg}})


def _read_quantized(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    file = directory / SINGLE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no {SINGLE_FILE}; save_quantized writes one file")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{file} has no {METADATA_KEY!r} tag in its metadata: it is not a quantized checkpoint "
                         "of this zoo; load it with architectures.registry.from_pretrained")
    return state, json.loads(metadata[METADATA_KEY])


def load_quantized(directory: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_quantized`: the family's model from config.json, quantized empty
    with the recorded settings, then every tensor loaded strictly. `dtype` is the float dtype of the
    parts kept in full precision (and of the computation); the codes and scales keep theirs."""
    directory = Path(directory)
    raw = read_config_json(directory)
    qcfg = raw.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") != "zoo":
        raise ValueError(f"{directory}/config.json has no zoo quantization_config; it is not a checkpoint written "
                         "by save_quantized (load a float checkpoint with architectures.registry.from_pretrained)")
    state, tag = _read_quantized(directory)
    qcfg = {k: v for k, v in qcfg.items() if k != "quant_method"}
    if tag != qcfg:
        raise ValueError(f"{directory}: config.json's quantization_config {qcfg} disagrees with the format tag of "
                         f"{SINGLE_FILE} {tag}; the two files come from different saves")
    name = registry.family_for_model_type(raw.get("model_type"))
    if name is None:
        raise ValueError(f"{directory}/config.json has model_type={raw.get('model_type')!r}; "
                         f"{registry.loader_hint(raw.get('model_type'))}")
    config_module = registry.family(name).config
    cfg = config_module.from_hf_config(raw, where=f"{directory}/config.json")
    with torch.device("meta"):
        model = registry.model_class(name)(cfg)
    # Quantized layers are built directly on the device with empty buffers of the recorded format.
    for layer_name, linear in _linears(model, tuple(qcfg["skip"])):
        _replace(model, layer_name, QuantizedLinear(linear.in_features, linear.out_features, qcfg["format"],
                                                    qcfg["group_size"], linear.bias is not None,
                                                    qcfg["double_quant"], device=device))
    model = materialize(model, device)
    _check_quantized_tensors(model, state, qcfg, directory)
    load_state_dict_strict(model, state, where=str(directory))
    model.quantization_config = qcfg
    return model.to(dtype=dtype).eval()


def _check_quantized_tensors(model: nn.Module, state: dict[str, torch.Tensor], qcfg: dict, directory: Path) -> None:
    """Every quantized tensor in the file has the dtype and shape that the recorded format gives it.
    (A plain copy would silently convert, say, int8 codes into uint8 ones.)"""
    for prefix, layer in model.named_modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        for part, expected in layer._buffers.items():
            name = f"{prefix}.{part}"
            found = state.get(name)
            if found is not None and (found.dtype != expected.dtype or found.shape != expected.shape):
                raise ValueError(
                    f"{directory}: tensor {name} is {found.dtype} {tuple(found.shape)}, but the checkpoint's format "
                    f"tag says {qcfg['format']} (group_size={qcfg['group_size']}), which stores it as "
                    f"{expected.dtype} {tuple(expected.shape)}; the tag and the tensors do not belong together")

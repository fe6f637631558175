"""LoRA and DoRA adapters: train a low-rank update beside each frozen linear layer.

    LoRA   y = W x + b + s * B A dropout(x)                      s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA   y = m / ||W + s B A||_c * (W + s B A) x + b           ||.||_c: the norm of each output row, detached

Papers: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021, arXiv:2106.09685);
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (Kalajdzievski, 2023,
arXiv:2312.03732); "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al., 2024, arXiv:2402.09353).
Reference implementation it is tested against: PEFT's LoRA (`peft.get_peft_model` with a
`LoraConfig`), logits equal in both directions of save/load (tests/training/lora/test_lora.py).
The module layout is PEFT's (`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`,
`q_proj.lora_magnitude_vector`), so the tensors of an adapter file load by name.

Symbols: d_in in_features, d_out out_features, r rank, s scaling, W the frozen (d_out, d_in)
weight, A (r, d_in), B (d_out, r), m DoRA's magnitude (d_out,).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Every projection of a Llama-style block: attention and the SwiGLU feed-forward.
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    r: int = 8  # rank of the update B A; trainable numbers per layer are r * (d_in + d_out)
    alpha: float = 16  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input x (the base path never drops)
    # Which linear layers get an adapter, matched against each module's full name as PEFT matches:
    # a list of suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj"), or one regex string
    # that must match the whole name ("model\.layers\.0\..*_proj").
    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # DoRA: a trained magnitude per output row times the adapted direction

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got r={self.r!r}; "
                             f"ranks 4 to 64 are usual (r=8 is the default)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRA alpha must be a finite number > 0 (the update is scaled by alpha / r), got "
                             f"alpha={self.alpha!r}; 2 x r is usual (alpha=16 for r=8)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if not isinstance(targets, str) and not (isinstance(targets, (list, tuple, set)) and targets
                                                 and all(isinstance(t, str) for t in targets)):
            raise ValueError(f"target_modules must be a non-empty list of module-name suffixes or one regex string, "
                             f"got {targets!r}")


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a layer that behaves as one and can hand out its float weight (a quantized
    linear for QLoRA: `in_features`, `out_features`, `bias` and `dequantize_weight()`)."""
    if isinstance(module, nn.Linear):
        return True
    return (callable(getattr(module, "dequantize_weight", None)) and hasattr(module, "in_features")
            and hasattr(module, "out_features"))


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex for the whole name; a list entry matches the whole name or
    its last dotted components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers, not counting those inside a LoRALinear."""
    names, wrapped = [], []
    for n, m in model.named_modules():
        if any(n.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, LoRALinear):
            wrapped.append(n)
        if n and (is_linear(m) or isinstance(m, LoRALinear)):
            names.append(n)
    return names


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the linear modules `config.target_modules` selects; a clear error if none."""
    config.validate()
    names = linear_names(model)
    found = [n for n in names if name_matches(n, config.target_modules)]
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        example = names[0] if names else "none"
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no linear module of {type(model).__name__}; "
            f"its linear modules end in {', '.join(suffixes)} (full names like {example!r}). Pass some of those "
            f"(a list of suffixes, or one regex that matches whole names)")
    return found


class LoRALinear(nn.Module):
    """A frozen linear layer (`base_layer`) plus a trainable low-rank update.

    forward(x) = base(x) + s * B(A(dropout(x)))   (DoRA: see `dora_delta`). B starts at zero, so
    a fresh adapter leaves the model's function unchanged; A starts as nn.Linear's default
    (Kaiming-uniform, a = sqrt(5)), as PEFT initialises it."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a quantized linear with dequantize_weight(), "
                            f"got {type(base).__name__}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters train in fp32 even over a bf16 or quantized base, as PEFT keeps them by default:
        # AdamW's small updates vanish in bf16's 8-bit mantissa.
        w = self.base_weight()
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)  # A: (r, d_in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)  # B: (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # delta W = B A = 0 at the start
        if use_dora:
            # m starts as ||W + s B A||_c = ||W||_c, one norm per output row (norm over d_in): at the
            # start m / ||W||_c = 1 and DoRA, too, computes the base layer exactly.
            self.lora_magnitude_vector = nn.Parameter(w.detach().to(dtype).norm(dim=1))  # (d_out,)
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.merged = False  # the update is folded into base_layer's weight: forward adds nothing
        self.disabled = False  # under `disable_adapters`: forward is the base layer's alone
        self._merged_norm: torch.Tensor | None = None  # DoRA's ||W + s B A||_c at merge time, to unmerge

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """W (d_out, d_in) in floating point: the nn.Linear's weight, or the quantized layer's dequantized."""
        base = self.base_layer
        # dequantize_weight first: a quantized layer may subclass nn.Linear and hold packed codes in .weight
        return base.dequantize_weight() if callable(getattr(base, "dequantize_weight", None)) else base.weight

    def delta_weight(self) -> torch.Tensor:
        """s * B A: (d_out, d_in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight this layer applies, for code that reads `proj.weight` instead of
        calling the layer (MLA's absorbed attention reads kv_b_proj's rows)."""
        w = self.base_weight()
        if self.merged or self.disabled:
            return w
        delta = self.delta_weight()
        if not self.use_dora:
            return w + delta.to(w.dtype)
        full = w.to(delta.dtype) + delta
        norm = full.detach().norm(dim=1)  # (d_out,)
        return ((self.lora_magnitude_vector / norm)[:, None] * full).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., d_out): W x + b
        if self.merged or self.disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        if self.use_dora:
            return (result + self.dora_delta(x, result)).to(result.dtype)
        return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(result.dtype)

    def dora_delta(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to base(x): (m/n - 1) W x + (m/n) s B A x, with n = ||W + s B A||_c.

        Then base(x) + this = (m/n) (W + s B A) x + b. The norm n is detached (DoRA, section 4.3):
        it follows B A in value but passes no gradient, which saves the memory of its backward.
        With dropout active, both W x and B A x read the dropped input, as PEFT computes it."""
        w = self.base_weight().to(x.dtype)  # (d_out, d_in)
        norm = (w + self.delta_weight().detach()).norm(dim=1).detach()  # (d_out,)
        scale = self.lora_magnitude_vector / norm  # (d_out,) m / n
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            x = self.lora_dropout(x)
            base = F.linear(x, w)  # W dropout(x), no bias
        else:
            base = result.to(x.dtype) if self.bias is None else (result - self.bias).to(x.dtype)  # W x
        return (scale - 1) * base + scale * self.lora_B(self.lora_A(x)) * self.scaling

    # ---- merge / unmerge ---------------------------------------------------------------------------

    def _mergeable_weight(self) -> nn.Parameter:
        if not isinstance(self.base_layer, nn.Linear) or callable(getattr(self.base_layer, "dequantize_weight", None)):
            raise ValueError(
                f"cannot merge a LoRA adapter into a {type(self.base_layer).__name__}: the update B A is "
                f"full precision and the base is not. Merge into a full-precision base instead: load the "
                f"base model in fp32 or bf16, load_adapter onto it, then merge")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A (DoRA: W <- m / ||W + s B A||_c * (W + s B A)); forward then adds nothing."""
        if self.merged:
            return
        if self.disabled:
            raise ValueError("cannot merge while adapters are disabled; merge outside `disable_adapters`")
        weight = self._mergeable_weight()
        w = weight.float()
        full = w + self.delta_weight().float()
        if self.use_dora:
            self._merged_norm = full.norm(dim=1)  # kept: unmerge needs the norm of the unmerged weight
            full = (self.lora_magnitude_vector.float() / self._merged_norm)[:, None] * full
        weight.copy_(full)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W <- W - s B A (DoRA: W <- W * n / m - s B A), exact up to rounding."""
        if not self.merged:
            return
        weight = self._mergeable_weight()
        w = weight.float()
        if self.use_dora:
            w = w * (self._merged_norm / self.lora_magnitude_vector.float())[:, None]
            self._merged_norm = None
        weight.copy_(w - self.delta_weight().float())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **overrides) -> nn.Module:
    """Wrap every linear layer that config.target_modules selects in a `LoRALinear` (in place) and
    freeze everything else, so an optimizer over requires_grad parameters holds only adapters.
    Keyword overrides replace config fields: apply_lora(model, r=16, use_dora=True)."""
    config = config or LoRAConfig()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LoRAConfig)})
    if unknown:
        raise ValueError(f"unknown LoRA option(s) {unknown}; LoRAConfig's fields are "
                         f"{[f.name for f in dataclasses.fields(LoRAConfig)]}")
    config = dataclasses.replace(config, **overrides)
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; apply_lora once per model "
                         f"(merge or reload the base to start over)")
    targets = find_targets(model, config)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.alpha, config.dropout,
                                          config.use_rslora, config.use_dora))
    model.lora_config = config  # what save_adapter writes as adapter_config.json
    return model


def _require_adapters(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to {action}; call apply_lora or "
                         f"load_adapter first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); `unmerge` takes them out again."""
    layers = _require_adapters(model, "merge")
    uses = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(n)
    for name, layer in layers.items():
        if isinstance(getattr(layer.base_layer, "weight", None), nn.Parameter):
            shared = uses.get(id(layer.base_layer.weight), [])
            if len(shared) > 1:
                raise ValueError(f"{name}'s weight is tied to {[s for s in shared if not s.startswith(name + '.')]}: "
                                 f"merging would change both. Untie them (a copy of the weight) before merging")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again (in place)."""
    for layer in _require_adapters(model, "unmerge").values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within this block every LoRALinear computes its base layer only: the model is its frozen
    base, with no second copy in memory (DPO's reference model). Merged adapters are unmerged
    for the block and merged again after it."""
    layers = list(_require_adapters(model, "disable").values())
    before = [(layer.disabled, layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, before):
            layer.disabled = False
            if merged:
                layer.merge()
            layer.disabled = disabled


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters), a tied tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)

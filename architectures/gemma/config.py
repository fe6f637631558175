"""Gemma 2 and Gemma 3 (text) configuration: the dataclass, named presets, and the config.json mapping.

One config describes both, because Gemma 3's text model is Gemma 2 with three changes:
- QK-norm: an RMSNorm over head_dim on every head of q and k (`model_type` "gemma3_text");
- five sliding-window ("local") layers to one global layer instead of alternating one to one
  (`sliding_window_pattern` 6 instead of 2), with a 1,024- or 512-token window instead of 4,096;
- two RoPE bases: 10,000 on the local layers, 1,000,000 (with a linear x8 scaling in 4B-27B) on
  the global ones; and no soft-capping (Gemma 2 caps attention scores at 50 and logits at 30).
Field names follow transformers' `Gemma2Config` and `Gemma3TextConfig`, so a published config.json
reads into `GemmaConfig`, and the one save_pretrained writes loads in transformers. The multimodal
Gemma 3 config (model_type "gemma3") nests the text model in `text_config`; `from_hf_config` reads
that part. Papers: "Gemma 2: Improving Open Language Models at a Practical Size" (2024,
arXiv:2408.00118); "Gemma 3 Technical Report" (2025, arXiv:2503.19786).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from architectures.common.checkpoint import check_model_type
from architectures.common.rope import read_hf_rope
from architectures.utils.config import config_from_dict, get_preset

MODEL_TYPES = ("gemma2", "gemma3_text")  # what our config describes; "gemma3" nests a gemma3_text
LAYER_TYPES = ("sliding_attention", "full_attention")  # transformers' names of a local and a global layer
ACTIVATION = "gelu_pytorch_tanh"  # GeGLU's gate: GELU with the tanh approximation, in every Gemma 2 and 3


@dataclass
class GemmaConfig:
    model_type: str = "gemma3_text"  # "gemma2" (Gemma2ForCausalLM) or "gemma3_text" (Gemma3ForCausalLM: adds QK-norm)
    vocab_size: int = 512  # tokens in the vocabulary (rows of the embedding, which the head shares)
    hidden_size: int = 128  # d_model: width of the residual stream; embeddings are scaled by sqrt of it
    intermediate_size: int = 384  # d_ff: hidden width of the GeGLU feed-forward
    num_hidden_layers: int = 6  # transformer blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 1  # key/value heads; fewer than query heads = grouped-query attention
    head_dim: int | None = 32  # width of one head; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 256  # longest sequence the model accepts
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm's square root
    rope_theta: float = 10000.0  # RoPE base of the global (full-attention) layers
    rope_local_base_freq: float | None = None  # RoPE base of the sliding-window layers; None: rope_theta (Gemma 2's one table)
    rope_scaling: dict | None = None  # the global layers' RoPE scaling {rope_type: "linear", factor}, or None
    sliding_window: int = 32  # tokens a local layer's query sees, itself included
    sliding_window_pattern: int = 6  # layer i is global when (i + 1) % pattern == 0: 2 in Gemma 2, 6 in Gemma 3
    layer_types: list | None = None  # per layer "sliding_attention" or "full_attention"; None: from sliding_window_pattern
    query_pre_attn_scalar: int = 32  # the attention scale is query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None  # scores become c * tanh(score / c) before the softmax (Gemma 2: 50)
    final_logit_softcapping: float | None = None  # logits become c * tanh(logit / c) (Gemma 2: 30)
    tie_word_embeddings: bool = True  # output head shares the embedding matrix (every Gemma)
    attention_bias: bool = False  # biases on q/k/v/o projections (False in every Gemma)
    dropout: float = 0.0  # dropout on attention probabilities and residual branches (training only; ours)
    initializer_range: float = 0.02  # std of the normal init of every weight matrix
    bos_token_id: int | None = None  # beginning-of-text id, for generation
    eos_token_id: int | list | None = None  # end-of-text id(s): generation stops there

    DERIVED = ("head_dim", "layer_types", "rope_local_base_freq")  # None means "derive it": re-derived when a command line changes the sizes

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"GemmaConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "sliding_window_pattern",
                     "query_pre_attn_scalar"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemmaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.sliding_window < 1:
            raise ValueError(f"GemmaConfig.sliding_window must be a positive number of tokens, got "
                             f"{self.sliding_window}; a local layer's query sees the last sliding_window tokens")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                                 f"{self.num_attention_heads}; change one of them or set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of channels")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (each KV head serves a whole group)")
        if self.rope_local_base_freq is None:
            self.rope_local_base_freq = self.rope_theta
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = [LAYER_TYPES[(i + 1) % p == 0] for i in range(self.num_hidden_layers)]
        self._check_layer_types()
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"GemmaConfig.{name} must be positive or None, got {getattr(self, name)}")
        if self.model_type == "gemma3_text" and self.attn_logit_softcapping is not None:
            raise ValueError("attn_logit_softcapping is Gemma 2's: transformers' Gemma3ForCausalLM ignores it, so a "
                             "gemma3_text checkpoint with it would compute another function there; set it to None "
                             "or use model_type 'gemma2'")
        if self.model_type == "gemma2" and (self.rope_local_base_freq != self.rope_theta or self.rope_scaling):
            raise ValueError(f"Gemma 2 has one RoPE table for all layers: rope_local_base_freq="
                             f"{self.rope_local_base_freq} must equal rope_theta={self.rope_theta} and rope_scaling "
                             f"must be None (got {self.rope_scaling}); two bases are Gemma 3's (model_type 'gemma3_text')")
        if self.rope_scaling is not None and (self.rope_scaling.get("rope_type") != "linear"
                                              or not self.rope_scaling.get("factor", 0) > 0):
            raise ValueError(f"rope_scaling={self.rope_scaling} is not supported; Gemma 3 scales its global layers' "
                             f"RoPE with {{'rope_type': 'linear', 'factor': F}}, F > 0, or None")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def _check_layer_types(self) -> None:
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must list one type per layer, {self.num_hidden_layers} of them "
                             f"(num_hidden_layers), got {self.layer_types!r}")
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(f"layer_types has unknown entr{'ies' if len(unknown) > 1 else 'y'} {unknown}; each layer "
                             f"is 'sliding_attention' (local) or 'full_attention' (global)")

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 normalises q and k per head (RMSNorm over head_dim) before RoPE; Gemma 2 does not."""
        return self.model_type == "gemma3_text"

    def window(self, layer_idx: int) -> int | None:
        """Layer i's sliding window in tokens, or None for a global layer."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None


_GEMMA3_LINEAR_ROPE = {"rope_type": "linear", "factor": 8.0}

PRESETS: dict[str, GemmaConfig] = {
    # CPU quick start (vocab_size is set from the trained tokenizer): Gemma 3's shape in miniature, five
    # local layers with a 32-token window to one global layer, QK-norm, two RoPE bases, one KV head.
    "tiny": GemmaConfig(rope_theta=1000000.0, rope_local_base_freq=10000.0),
    # The published shapes: google/gemma-2-2b, google/gemma-3-1b-pt (config.json), google/gemma-3-27b-pt
    # (its text_config; the keys it leaves out take Gemma3TextConfig's defaults, vocab_size 262,208 among them).
    "gemma-2-2b": GemmaConfig(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                              num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                              max_position_embeddings=8192, rope_theta=10000.0, sliding_window=4096, sliding_window_pattern=2, query_pre_attn_scalar=256,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, bos_token_id=2,
                              eos_token_id=1),
    "gemma-3-1b": GemmaConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                              max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                              sliding_window=512, query_pre_attn_scalar=256, bos_token_id=2, eos_token_id=1),
    "gemma-3-27b": GemmaConfig(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                               num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                               max_position_embeddings=131072, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                               rope_scaling=_GEMMA3_LINEAR_ROPE, sliding_window=1024,
                               query_pre_attn_scalar=168, bos_token_id=2, eos_token_id=[1, 106]),
}


def preset(name: str) -> GemmaConfig:
    cfg = get_preset(PRESETS, name, "gemma")
    return dataclasses.replace(cfg, layer_types=list(cfg.layer_types),
                               rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None)


# ---- Hugging Face config.json <-> GemmaConfig -------------------------------------------------

HF_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# What transformers' Gemma2Config and Gemma3TextConfig assume for a key config.json leaves out (the
# published Gemma 3 text_config lists only what differs from them); tests compare them with transformers'.
HF_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096, sliding_window_pattern=2,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   tie_word_embeddings=True, attention_bias=False, initializer_range=0.02, bos_token_id=2,
                   eos_token_id=1),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=4096,
                        sliding_window_pattern=6, query_pre_attn_scalar=256, attn_logit_softcapping=None,
                        final_logit_softcapping=None, tie_word_embeddings=True, attention_bias=False,
                        initializer_range=0.02, bos_token_id=2, eos_token_id=1),
}


def text_config(d: dict, where: str) -> dict:
    """The text model's config.json dict: `d` itself, or the `text_config` a multimodal Gemma 3 nests
    (with the generation ids of the outer config where the inner one has none)."""
    if d.get("model_type") != "gemma3":
        if d.get("model_type") not in MODEL_TYPES:
            check_model_type(d, MODEL_TYPES[1], where)  # the error that names the family that loads it
        return d
    inner = d.get("text_config")
    if not isinstance(inner, dict):
        raise ValueError(f"{where}: a model_type 'gemma3' config must nest the text model's config in text_config, "
                         f"got text_config={inner!r}")
    outer = {k: d[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if k in d}
    return {**outer, **inner, "model_type": "gemma3_text"}


def _read_rope(d: dict, where: str) -> dict:
    """The RoPE fields: transformers 5 writes `rope_parameters` (for Gemma 3, one dict per layer type);
    earlier files write rope_theta, rope_local_base_freq and rope_scaling. Both are read."""
    if d["model_type"] == "gemma2":
        theta = read_hf_rope(d, ("default",), where, "Gemma 2")[0]
        return dict(rope_theta=theta, rope_local_base_freq=theta, rope_scaling=None)
    per_type = d.get("rope_parameters")
    if isinstance(per_type, dict) and set(per_type) & set(LAYER_TYPES):
        glob, local = per_type.get("full_attention") or {}, per_type.get("sliding_attention") or {}
    else:  # one global dict (rope_parameters or rope_scaling) beside rope_theta, and rope_local_base_freq
        glob = dict(d.get("rope_parameters") or d.get("rope_scaling") or {}, rope_theta=d["rope_theta"])
        local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)}
    theta, kind, rest = read_hf_rope({"rope_parameters": glob}, ("default", "linear"), where, "Gemma 3's global layers")
    local_theta, _, _ = read_hf_rope({"rope_parameters": local}, ("default",), where, "Gemma 3's local layers")
    scaling = {"rope_type": "linear", "factor": float(rest["factor"])} if kind == "linear" else None
    return dict(rope_theta=theta, rope_local_base_freq=local_theta, rope_scaling=scaling)


def from_hf_config(d: dict, where: str = "config.json") -> GemmaConfig:
    """Read a Gemma 2 or Gemma 3 config.json dict (a multimodal Gemma 3's text part); refuse settings that
    would change the math."""
    d = text_config(d, where)
    d = {**HF_DEFAULTS[d["model_type"]], **d}
    if d.get("hidden_activation", ACTIVATION) != ACTIVATION:
        raise ValueError(f"{where}: hidden_activation={d['hidden_activation']!r} is not Gemma's GeGLU gate "
                         f"({ACTIVATION!r})")
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true makes an encoder (EmbeddingGemma); the zoo's "
                         f"Gemma is a causal language model")
    if d["model_type"] == "gemma3_text":
        d["attn_logit_softcapping"] = None  # transformers' Gemma3Attention does not apply it: neither do we
    fields = {f.name for f in dataclasses.fields(GemmaConfig)}
    kwargs = {k: v for k, v in d.items() if k in fields and k not in ("rope_theta", "rope_scaling", "dropout")}
    kwargs.update(_read_rope(d, where))
    return config_from_dict(GemmaConfig, kwargs, where)


def to_hf_config(cfg: GemmaConfig) -> dict:
    """The config.json transformers' Gemma2ForCausalLM or Gemma3ForCausalLM reads (rope keys as every
    transformers version since Gemma 3's release reads them)."""
    d = dataclasses.asdict(cfg)
    d.pop("dropout")
    if cfg.model_type == "gemma2":
        d.pop("rope_local_base_freq")
        d.pop("rope_scaling")
    return {"architectures": [HF_ARCHITECTURES[cfg.model_type]], "hidden_activation": ACTIVATION, **d}

"""Llama 3 configuration: the dataclass, named presets, and the Hugging Face config.json mapping.

Field names follow Hugging Face's `LlamaConfig`, so a config.json published on the hub
reads straight into `LlamaConfig` and the config.json our train script writes loads in
transformers too. Paper: "The Llama 3 Herd of Models" (2024, arXiv:2407.21783).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from architectures.common.checkpoint import check_model_type
from architectures.utils.config import config_from_dict, get_preset
from architectures.common.rope import read_hf_rope

# The rope_scaling keys of Llama 3.1's frequency scaling (see model.rope_inverse_frequencies).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int = 512  # tokens in the vocabulary (rows of the embedding and of the output head)
    hidden_size: int = 128  # d_model: width of the residual stream
    intermediate_size: int = 384  # d_ff: hidden width of the SwiGLU feed-forward
    num_hidden_layers: int = 4  # transformer blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 4  # key/value heads; fewer than query heads = grouped-query attention
    head_dim: int | None = None  # width of one head; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 256  # longest sequence the model accepts
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm's square root
    rope_theta: float = 10000.0  # RoPE base: wavelengths range from 2*pi to about 2*pi*theta
    rope_scaling: dict | None = None  # Llama 3.1 frequency scaling {factor, low/high_freq_factor, original_max_position_embeddings}, or None
    tie_word_embeddings: bool = False  # output head shares the embedding matrix
    attention_bias: bool = False  # biases on q/k/v/o projections (False in every Llama 3)
    mlp_bias: bool = False  # biases on the feed-forward projections (False in every Llama 3)
    dropout: float = 0.0  # dropout on attention probabilities and residual branches (training only)
    initializer_range: float = 0.02  # std of the normal init of every weight matrix
    bos_token_id: int | None = None  # beginning-of-text id, for generation
    eos_token_id: int | list | None = None  # end-of-text id(s): generation stops there

    DERIVED = ("head_dim",)  # None means "derive it": re-derived when a command line changes the sizes

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of channels")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (each KV head serves a whole group of query heads)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling is missing {missing}; Llama 3.1 scaling needs {list(LLAMA3_ROPE_KEYS)}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (the GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads


def llama3_intermediate_size(hidden_size: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """The SwiGLU width F that Meta's Llama 3 code derives from the model width D (its params.json
    gives `dim`, `ffn_dim_multiplier` and `multiple_of`; the hub's config.json stores the result):

        F = int(2 * 4D / 3)                  # 8D/3: three matrices cost what a 4D GELU MLP's two do
        F = int(ffn_dim_multiplier * F)      # widened: 1.3 in Llama 3 8B, 1.5 in 3.2 1B, 1.0 in 3.2 3B
        F = multiple_of * ceil(F / multiple_of)  # rounded up to a multiple of 256 or 1024

    Llama 3 8B: (4096, 1.3, 1024) -> 14336; Llama 3.2 1B: (2048, 1.5, 256) -> 8192; 3B: (3072, 1.0, 256) -> 8192.
    """
    hidden_dim = int(2 * (4 * hidden_size) / 3)
    hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


_LLAMA32_ROPE = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA31_ROPE = dict(_LLAMA32_ROPE, factor=8.0)

# intermediate_size: the published presets carry Meta's value, which `llama3_intermediate_size`
# reproduces (tests/architectures/llama3/test_config.py); our own three were picked by hand, not derived.
# shakespeare's and gpt2-124m's equal the rule at (1.0, 256), which is 8D/3; tiny's 384 = 3D does not
# (the rule at (1.0, 256) gives 512).
PRESETS: dict[str, LlamaConfig] = {
    # CPU quick start: a few minutes on 2 cores (vocab_size is set from the trained tokenizer).
    "tiny": LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256),
    # One GPU, Tiny Shakespeare: nanoGPT's char model width and depth, with GQA and SwiGLU.
    "shakespeare": LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                               num_key_value_heads=2, max_position_embeddings=256, dropout=0.3),
    # GPT-2 small's budget (12 x 768, ~124M parameters with a 50k vocabulary), for speed benchmarks.
    "gpt2-124m": LlamaConfig(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                             tie_word_embeddings=True),
    # The published shapes (meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B config.json); intermediate_size
    # is llama3_intermediate_size(D, ffn_dim_multiplier, multiple_of) of Meta's params.json: (1.5, 256), (1.0, 256), (1.3, 1024).
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
                                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                                tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
}


def preset(name: str) -> LlamaConfig:
    return dataclasses.replace(get_preset(PRESETS, name, "llama3"))


# ---- Hugging Face config.json <-> LlamaConfig -------------------------------------------------

HF_MODEL_TYPE = "llama"
HF_ARCHITECTURE = "LlamaForCausalLM"


def from_hf_config(d: dict, where: str = "config.json") -> LlamaConfig:
    """Read a Hugging Face Llama config.json dict; refuse settings that would change the math."""
    check_model_type(d, HF_MODEL_TYPE, where)
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={d['hidden_act']!r} is not Llama's SwiGLU ('silu')")
    theta, rope_type, rope = read_hf_rope(d, ("default", "llama3"), where, "Llama 3")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    kwargs = {k: v for k, v in d.items() if k in fields and k not in ("rope_theta", "rope_scaling", "dropout")}
    kwargs["rope_theta"] = theta
    kwargs["rope_scaling"] = {k: rope[k] for k in LLAMA3_ROPE_KEYS if k in rope} if rope_type == "llama3" else None
    return config_from_dict(LlamaConfig, kwargs, where)


def to_hf_config(cfg: LlamaConfig) -> dict:
    """The config.json transformers' LlamaForCausalLM reads (legacy rope keys, read by v4 and v5)."""
    d = dataclasses.asdict(cfg)
    d.pop("dropout")
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = dict(cfg.rope_scaling, rope_type="llama3")
    return {"model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE], "hidden_act": "silu", **d}

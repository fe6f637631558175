"""Mamba-2 and its hybrids: the dataclass, named presets, and the two Hugging Face config.json mappings.

One config describes both model types this family loads, because a pure Mamba-2 is the hybrid
whose every layer is a Mamba-2 layer:
- transformers' `Mamba2ForCausalLM` (model_type "mamba2"): every layer "M";
- transformers' `NemotronHForCausalLM` (model_type "nemotron_h"): one layer per letter of
  `hybrid_override_pattern`: M = Mamba-2, * = attention, - = MLP, E = mixture of experts.
Papers: "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality" (Dao & Gu, 2024, arXiv:2405.21060); "Nemotron-H: A Family of Accurate and
Efficient Hybrid Mamba-Transformer Models" (NVIDIA, 2025, arXiv:2504.03624).

Symbols of the Mamba-2 layer (the paper's): H heads (mamba_num_heads), P head dim (mamba_head_dim),
N state size (ssm_state_size), G groups sharing B and C (n_groups), K conv kernel width, Q chunk size.

Two settings differ between transformers' two classes, so they are fields here, set by the loader:
- `gated_norm_per_group`: NemotronH (and the original mamba_ssm) normalise y * silu(z) in G groups
  of H*P/G channels; transformers' Mamba2 torch code normalises the whole H*P width at once. The
  two agree when G = 1 (every published Mamba-2 checkpoint of state-spaces has G = 1).
- `time_step_limit`: the clamp of dt after the softplus. Mamba2 reads it from config.json;
  NemotronH clamps to (time_step_min, inf) whatever config.json says.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from architectures.common.checkpoint import check_model_type
from architectures.utils.config import config_from_dict, get_preset

LETTERS = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "mixture of experts"}
# transformers' NemotronH `layers_block_type` names of the letters
BLOCK_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
HF_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
MLP_ACTIVATIONS = ("relu2", "relu", "silu", "gelu")


@dataclass
class Mamba2HybridConfig:
    model_type: str = "nemotron_h"  # the transformers class save_pretrained writes for: "mamba2" or "nemotron_h"
    vocab_size: int = 512  # V: tokens in the vocabulary
    hidden_size: int = 128  # D: width of the residual stream
    num_hidden_layers: int = 8  # L: blocks, one per letter of the pattern
    hybrid_override_pattern: str = "M-M*M-M-"  # layer i's block: M Mamba-2, * attention, - MLP, E MoE
    # ---- Mamba-2 layers ("M")
    mamba_num_heads: int = 8  # H: SSM heads, each with its own scalar decay A and step dt
    mamba_head_dim: int = 32  # P: channels per head; the inner width is H * P
    ssm_state_size: int = 32  # N: state size per channel (the width of B and C)
    n_groups: int = 1  # G: groups of heads that share one B and one C (as GQA shares K and V)
    conv_kernel: int = 4  # K: width of the depthwise causal convolution over (x, B, C)
    chunk_size: int = 64  # Q: tokens per chunk of the chunked SSD algorithm (changes speed, not the function)
    use_bias: bool = False  # biases on in_proj and out_proj
    use_conv_bias: bool = True  # bias of the convolution
    time_step_min: float = 0.001  # dt at initialisation is log-uniform in [min, max]
    time_step_max: float = 0.1  # the upper end of that range
    time_step_floor: float = 1e-4  # ... and at least this
    time_step_limit: list = field(default_factory=lambda: [0.001, math.inf])  # dt is clamped to [lo, hi] after softplus
    gated_norm_per_group: bool = True  # normalise y * silu(z) per group of H*P/G channels (else the whole width)
    # ---- attention layers ("*"): Llama 3's grouped-query attention without RoPE
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention)
    head_dim: int = 32  # width of one attention head
    max_position_embeddings: int = 1024  # longest sequence accepted (the Mamba layers have no limit of their own)
    # ---- MLP layers ("-"): up, activation, down (no gate)
    intermediate_size: int = 256  # hidden width of the MLP
    mlp_hidden_act: str = "relu2"  # relu(x)^2 in Nemotron-H ("Primer", arXiv:2109.08668)
    mlp_bias: bool = False  # biases on the MLP projections
    # ---- MoE layers ("E"): DeepSeek-V3's sigmoid router, non-gated experts, one shared expert
    n_routed_experts: int = 8  # E: routed experts per MoE layer
    num_experts_per_tok: int = 2  # k: experts per token
    moe_intermediate_size: int = 64  # hidden width of one routed expert
    moe_shared_expert_intermediate_size: int = 64  # hidden width of the shared expert
    moe_latent_size: int | None = None  # experts work in a smaller latent of this width (None: D)
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may pick its experts from
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' output
    routing_bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free balancing (ours, as deepseek_v3)
    # ---- everywhere
    layer_norm_epsilon: float = 1e-5  # epsilon of every RMSNorm (block norms, gated norm, final norm)
    residual_in_fp32: bool = False  # keep the residual stream in fp32 under bf16 (Mamba2's default: True)
    tie_word_embeddings: bool = False  # output head shares the embedding matrix
    dropout: float = 0.0  # dropout on attention probabilities (training only; ours)
    initializer_range: float = 0.02  # std of the normal init of every weight matrix
    bos_token_id: int | None = None  # beginning-of-text id, for generation
    eos_token_id: int | list | None = None  # end-of-text id(s): generation stops there

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "mamba_num_heads", "mamba_head_dim",
                     "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "moe_shared_expert_intermediate_size", "n_group", "topk_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"Mamba2HybridConfig.{name} must be >= 1, got {getattr(self, name)}"
                                 + (" (the chunked SSD cuts the sequence into chunks of Q >= 1 tokens)"
                                    if name == "chunk_size" else ""))
        if self.model_type not in ("mamba2", "nemotron_h"):
            raise ValueError(f"model_type must be 'mamba2' or 'nemotron_h', got {self.model_type!r}")
        bad = sorted({c for c in self.hybrid_override_pattern if c not in LETTERS})
        if bad:
            raise ValueError(f"hybrid_override_pattern {self.hybrid_override_pattern!r} has unknown letter(s) "
                             f"{bad}; the letters are " + ", ".join(f"{k!r} {v}" for k, v in LETTERS.items()))
        if len(self.hybrid_override_pattern) != self.num_hidden_layers:
            raise ValueError(f"hybrid_override_pattern {self.hybrid_override_pattern!r} has "
                             f"{len(self.hybrid_override_pattern)} letters but num_hidden_layers="
                             f"{self.num_hidden_layers}: one letter per layer")
        if self.model_type == "mamba2" and set(self.hybrid_override_pattern) != {"M"}:
            raise ValueError(f"model_type 'mamba2' has Mamba-2 layers only, but the pattern is "
                             f"{self.hybrid_override_pattern!r}; use model_type 'nemotron_h' for a hybrid")
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"mamba_num_heads={self.mamba_num_heads} is not divisible by n_groups={self.n_groups}: "
                             f"each group of heads shares one B and one C, so the groups must be of equal size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even")
        if self.mlp_hidden_act not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_hidden_act={self.mlp_hidden_act!r} is not one of {MLP_ACTIVATIONS}")
        if "E" in self.hybrid_override_pattern:
            if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
                raise ValueError(f"n_routed_experts={self.n_routed_experts} must split into n_group={self.n_group} "
                                 f"groups, and topk_group={self.topk_group} <= n_group")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts="
                                 f"{self.n_routed_experts}")
        lo, hi = (float(v) for v in self.time_step_limit)
        if len(self.time_step_limit) != 2 or not 0.0 <= lo <= hi:
            raise ValueError(f"time_step_limit must be [lo, hi] with 0 <= lo <= hi, got {self.time_step_limit}")
        self.time_step_limit = [lo, hi]
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_inner(self) -> int:
        """H * P: the width of x, z and y inside a Mamba-2 layer."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels the convolution runs over: x (H*P), B (G*N) and C (G*N)."""
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def attention_bias(self) -> bool:
        """NemotronH's attention projections have no biases (transformers ignores the config key)."""
        return False

    def layer_kind(self, i: int) -> str:
        return BLOCK_TYPES[self.hybrid_override_pattern[i]]


PRESETS: dict[str, Mamba2HybridConfig] = {
    # CPU quick start: 8 layers, hybrid (4 Mamba-2, 1 attention, 3 MLP), Llama 3 tiny's width.
    "tiny": Mamba2HybridConfig(hidden_size=128, num_hidden_layers=8, hybrid_override_pattern="M-M*M-M-",
                               mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=1, chunk_size=64,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=384,
                               max_position_embeddings=256),
    # One GPU, Tiny Shakespeare: Llama 3 shakespeare's width; 12 layers, 6 Mamba-2, 2 attention, 4 MLP.
    "shakespeare": Mamba2HybridConfig(hidden_size=384, num_hidden_layers=12, hybrid_override_pattern="M-M*M-M-M*M-",
                                      mamba_num_heads=12, mamba_head_dim=64, ssm_state_size=64, n_groups=2,
                                      chunk_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                      intermediate_size=1024, max_position_embeddings=256, dropout=0.2),
    # The published shapes. state-spaces/mamba2-2.7b: d_model 2560, 64 layers, headdim 64, d_state 128,
    # ngroups 1, expand 2, vocabulary 50277 padded to a multiple of 16, tied embeddings.
    "mamba2-2.7b": Mamba2HybridConfig(model_type="mamba2", vocab_size=50288, hidden_size=2560, num_hidden_layers=64,
                                      hybrid_override_pattern="M" * 64, mamba_num_heads=80, mamba_head_dim=64,
                                      ssm_state_size=128, n_groups=1, conv_kernel=4, chunk_size=256,
                                      time_step_limit=[0.0, math.inf], gated_norm_per_group=False,
                                      residual_in_fp32=True, tie_word_embeddings=True,
                                      max_position_embeddings=1 << 20, bos_token_id=0, eos_token_id=0),
    # nvidia/Nemotron-H-8B-Base-8K: 52 layers, 24 Mamba-2 + 4 attention + 24 MLP (squared ReLU).
    "nemotron-h-8b": Mamba2HybridConfig(vocab_size=131072, hidden_size=4096, num_hidden_layers=52,
                                        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                                        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
                                        conv_kernel=4, chunk_size=128,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                        intermediate_size=21504, max_position_embeddings=8192, bos_token_id=1,
                                        eos_token_id=2),
}


def preset(name: str) -> Mamba2HybridConfig:
    return dataclasses.replace(get_preset(PRESETS, name, "mamba2_hybrid"))


# ---- Hugging Face config.json <-> Mamba2HybridConfig -----------------------------------------

HF_MODEL_TYPES = ("mamba2", "nemotron_h")
HF_ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM", "nemotron_h": "NemotronHForCausalLM"}
_COMMON = ("vocab_size", "hidden_size", "n_groups", "conv_kernel", "chunk_size", "use_bias", "use_conv_bias",
           "time_step_min", "time_step_max", "time_step_floor", "layer_norm_epsilon", "residual_in_fp32",
           "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id")
# NemotronH's older hub configs name some Mamba fields with a mamba_ prefix (transformers reads both).
_NEMOTRON_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
                     "mamba_dt_max": "time_step_max", "mamba_dt_init_floor": "time_step_floor",
                     "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
                     "attention_head_dim": "head_dim"}
_NEMOTRON = ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "max_position_embeddings", "intermediate_size", "mlp_hidden_act", "mlp_bias",
             "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
             "moe_latent_size", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
             "routing_bias_update_speed")


def _float(v):
    """transformers writes inf in config.json as {"__float__": "Infinity"}; json.dumps as Infinity."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def from_hf_config(d: dict, where: str = "config.json") -> Mamba2HybridConfig:
    """Read a Mamba2 or NemotronH config.json dict; refuse settings that would change the math."""
    model_type = d.get("model_type")
    check_model_type(d, model_type if model_type in HF_MODEL_TYPES else "mamba2", where)
    kw = {k: d[k] for k in _COMMON if k in d}
    if model_type == "mamba2":
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act={d['hidden_act']!r}; Mamba-2's convolution uses 'silu'")
        heads, head_dim = d.get("num_heads", 128), d.get("head_dim", 64)
        expand = d.get("expand", 2)
        if expand * kw.get("hidden_size", 4096) != heads * head_dim:
            raise ValueError(f"{where}: expand * hidden_size = {expand} * {kw.get('hidden_size', 4096)} must equal "
                             f"num_heads * head_dim = {heads} * {head_dim}")
        L = d.get("num_hidden_layers", 64)
        kw.update(model_type="mamba2", mamba_num_heads=heads, mamba_head_dim=head_dim,
                  ssm_state_size=d.get("state_size", 128), num_hidden_layers=L, hybrid_override_pattern="M" * L,
                  time_step_limit=[_float(v) for v in d.get("time_step_limit", (0.0, math.inf))],
                  gated_norm_per_group=False, residual_in_fp32=d.get("residual_in_fp32", True),
                  max_position_embeddings=d.get("max_position_embeddings", 1 << 20))
        kw.setdefault("n_groups", 8)  # transformers' defaults where the file is silent
        kw.setdefault("chunk_size", 256)
        kw.setdefault("initializer_range", 0.1)
    else:
        d = dict(d)
        for old, new in _NEMOTRON_ALIASES.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        kw.update({k: d[k] for k in _COMMON + _NEMOTRON if k in d})
        if d.get("mamba_hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: mamba_hidden_act={d['mamba_hidden_act']!r}; this implementation computes 'silu'")
        if d.get("sliding_window") is not None:
            raise ValueError(f"{where}: sliding_window={d['sliding_window']} is not supported (full attention only)")
        blocks = d.get("layers_block_type")
        if blocks is not None:
            names = {v: k for k, v in HF_BLOCK_TYPES.items()} | {v: k for k, v in BLOCK_TYPES.items()}
            unknown = sorted({b for b in blocks if b not in names})
            if unknown:
                raise ValueError(f"{where}: layers_block_type has unknown block types {unknown}; "
                                 f"known: {sorted(names)}")
            pattern = "".join(names[b] for b in blocks)
        else:
            pattern = d.get("hybrid_override_pattern")
            if pattern is None:
                raise ValueError(f"{where}: a nemotron_h config.json needs layers_block_type or hybrid_override_pattern")
        # transformers derives the layer count from the pattern; an explicit num_hidden_layers must agree.
        L = d.get("num_hidden_layers") or len(pattern)
        mtp = d.get("num_nextn_predict_layers") or 0
        kw.update(model_type="nemotron_h", hybrid_override_pattern=pattern, num_hidden_layers=L,
                  time_step_limit=[float(kw.get("time_step_min", 0.001)), math.inf], gated_norm_per_group=True,
                  residual_in_fp32=d.get("residual_in_fp32", False))
        if mtp:
            print(f"{where}: num_nextn_predict_layers={mtp}: the multi-token-prediction layers (mtp.*) are skipped, "
                  f"as transformers skips them")
    return config_from_dict(Mamba2HybridConfig, kw, where)


def to_hf_config(cfg: Mamba2HybridConfig) -> dict:
    """The config.json of the transformers class that computes the same function; refuses a config
    that class cannot express (the error says which setting)."""
    common = {k: getattr(cfg, k) for k in _COMMON}
    if cfg.model_type == "mamba2":
        if cfg.gated_norm_per_group and cfg.n_groups > 1:
            raise ValueError("transformers' Mamba2 normalises the gated output over the whole width; a config with "
                             "gated_norm_per_group=True and n_groups > 1 can only be saved as model_type 'nemotron_h'")
        if cfg.d_inner % cfg.hidden_size:
            raise ValueError(f"transformers' Mamba2 needs H * P = {cfg.d_inner} to be a multiple (expand) of "
                             f"hidden_size={cfg.hidden_size}")
        return {"model_type": "mamba2", "architectures": [HF_ARCHITECTURES["mamba2"]], "hidden_act": "silu",
                **common, "num_heads": cfg.mamba_num_heads, "head_dim": cfg.mamba_head_dim,
                "state_size": cfg.ssm_state_size, "num_hidden_layers": cfg.num_hidden_layers,
                "expand": cfg.d_inner // cfg.hidden_size,
                "time_step_limit": list(cfg.time_step_limit), "max_position_embeddings": cfg.max_position_embeddings}
    if not cfg.gated_norm_per_group or cfg.time_step_limit != [cfg.time_step_min, math.inf]:
        raise ValueError("transformers' NemotronH normalises per group and clamps dt to [time_step_min, inf); "
                         f"this config has gated_norm_per_group={cfg.gated_norm_per_group}, "
                         f"time_step_limit={cfg.time_step_limit}")
    return {"model_type": "nemotron_h", "architectures": [HF_ARCHITECTURES["nemotron_h"]], **common,
            **{k: getattr(cfg, k) for k in _NEMOTRON}, "mamba_hidden_act": "silu",
            "layers_block_type": [HF_BLOCK_TYPES[c] for c in cfg.hybrid_override_pattern],
            "num_hidden_layers": cfg.num_hidden_layers, "time_step_limit": list(cfg.time_step_limit),
            "expand": 2, "use_mamba_kernels": False, "num_nextn_predict_layers": 0}

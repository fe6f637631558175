"""DeepSeek-V3 configuration: the dataclass, named presets, and the Hugging Face config.json mapping.

Field names are transformers' `DeepseekV3Config`, so a hub config.json (DeepSeek-V3, Kimi K2)
reads straight in and the config.json we write loads in transformers. Two groups of fields are
new beside Llama 3: multi-head latent attention (q_lora_rank, kv_lora_rank, qk_nope_head_dim,
qk_rope_head_dim, v_head_dim) and DeepSeekMoE (n_routed_experts, n_shared_experts,
moe_intermediate_size, num_experts_per_tok, n_group, topk_group, norm_topk_prob,
routed_scaling_factor, first_k_dense_replace). Paper: "DeepSeek-V3 Technical Report" (2024,
arXiv:2412.19437); MLA and DeepSeekMoE were introduced in "DeepSeek-V2" (2024, arXiv:2405.04434).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from architectures.common.cache import KVSpec
from architectures.common.checkpoint import check_model_type
from architectures.utils.config import config_from_dict, get_preset
from architectures.common.rope import YARN_KEYS, read_hf_rope

# Every key a YaRN rope_scaling may carry (transformers' required and optional keys).
YARN_OPTIONAL = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


@dataclass
class DeepseekV3Config:
    vocab_size: int = 512  # V: tokens in the vocabulary
    hidden_size: int = 128  # D: width of the residual stream
    intermediate_size: int = 384  # hidden width of the dense SwiGLU of the first_k_dense_replace layers
    moe_intermediate_size: int = 64  # F: hidden width of ONE routed (or shared) expert
    num_hidden_layers: int = 4  # L: transformer blocks (the hub's MTP layers come after them and are not counted)
    num_attention_heads: int = 4  # H: query heads (MLA gives every head its own keys and values)
    num_key_value_heads: int | None = None  # must equal num_attention_heads (transformers' field; None: the same)
    q_lora_rank: int | None = None  # d_c': queries go through a rank-d_c' bottleneck (None: one q_proj, as V2-Lite)
    kv_lora_rank: int = 32  # d_c: width of the compressed latent c_kv that is cached instead of K and V
    qk_nope_head_dim: int = 32  # d_h: per-head query/key channels WITHOUT position (decompressed from c_kv)
    qk_rope_head_dim: int = 16  # d_h^R: per-head query channels and SHARED key channels that carry RoPE
    v_head_dim: int = 32  # per-head value width (may differ from the q/k width d_h + d_h^R)
    n_routed_experts: int = 8  # N_r: fine-grained routed experts per MoE layer
    n_shared_experts: int = 1  # N_s: experts every token goes through (one SwiGLU of width N_s * F)
    num_experts_per_tok: int = 2  # K_r: routed experts per token
    n_group: int = 1  # expert groups (a node's worth of experts in DeepSeek's deployment)
    topk_group: int = 1  # groups a token may pick its experts from (group-limited routing)
    norm_topk_prob: bool = True  # renormalise the chosen experts' affinities to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' output (DeepSeek-V3: 2.5)
    first_k_dense_replace: int = 1  # the first k layers have a dense SwiGLU instead of the MoE
    routing_bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free balancing (ours; V3 uses 0.001)
    seq_aux_loss_alpha: float = 0.0  # alpha of the sequence-wise balance loss, training only (0: off; V3 used 0.0001)
    max_position_embeddings: int = 256  # longest sequence the model accepts
    rms_norm_eps: float = 1e-6  # epsilon of the block norms (the q/kv latent norms use 1e-6, as transformers)
    rope_theta: float = 10000.0  # RoPE base of the rotary channels
    rope_scaling: dict | None = None  # YaRN {factor, original_max_position_embeddings, beta_*, mscale*}, or None
    rope_interleave: bool = True  # rotary channels stored as adjacent pairs (DeepSeek's checkpoints) rather than halves
    attention_bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj (False in V3 and K2)
    tie_word_embeddings: bool = False  # output head shares the embedding matrix
    dropout: float = 0.0  # dropout on attention probabilities and residual branches (training only; ours)
    initializer_range: float = 0.02  # std of the normal init of every weight matrix
    bos_token_id: int | None = None  # beginning-of-text id, for generation
    eos_token_id: int | list | None = None  # end-of-text id(s): generation stops there

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"DeepseekV3Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
                f"{self.num_attention_heads}: multi-head latent attention decompresses keys and values for every head"
            )
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank must be None (no query compression) or >= 1, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates pairs of channels")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(
                f"topk_group={self.topk_group} > n_group={self.n_group}: a token picks its experts from topk_group of "
                f"the n_group expert groups; lower --topk-group or raise --n-group"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}: the routed "
                f"experts are split into n_group groups of equal size"
            )
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > reachable:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} is more than the {reachable} experts that "
                f"topk_group={self.topk_group} groups of {self.n_routed_experts // self.n_group} hold; lower "
                f"--num-experts-per-tok or raise --topk-group"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be between 0 and "
                             f"num_hidden_layers={self.num_hidden_layers}")
        if self.seq_aux_loss_alpha < 0:
            raise ValueError(f"seq_aux_loss_alpha={self.seq_aux_loss_alpha} must be >= 0: it weights a penalty on "
                             f"unbalanced routing (0 turns the loss off; DeepSeek-V3 used 0.0001)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            s = dict(self.rope_scaling)
            kind = s.pop("rope_type", s.pop("type", "yarn"))
            if kind != "yarn":
                raise ValueError(f"rope_scaling of type {kind!r} is not supported; DeepSeek-V3 uses 'yarn' (or none)")
            missing = [k for k in YARN_KEYS if s.get(k) is None]
            if missing:
                raise ValueError(f"rope_scaling is missing {missing}: YaRN needs {list(YARN_KEYS)} "
                                 f"(and may carry {list(YARN_OPTIONAL)})")
            unknown = sorted(set(s) - set(YARN_KEYS) - set(YARN_OPTIONAL))
            if unknown:
                raise ValueError(f"rope_scaling has unknown YaRN keys {unknown}; "
                                 f"valid: {list(YARN_KEYS + YARN_OPTIONAL)}")
            self.rope_scaling = s

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query and key: d_h + d_h^R."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_parameters(self) -> dict | None:
        """rope_scaling with its type, as architectures/common/rope.py reads it."""
        return None if self.rope_scaling is None else dict(self.rope_scaling, rope_type="yarn")

    def decompressed_kv_spec(self) -> KVSpec:
        """What one layer would cache if its keys and values were kept per head, decompressed: H keys of
        d_h + d_h^R and H values of d_v per token, where MLA keeps one latent row of d_c + d_h^R
        (`MultiHeadLatentAttention.cache_spec`). For comparisons only (`python -m inference.memory`)."""
        return KVSpec(self.num_attention_heads, self.qk_head_dim, self.v_head_dim)

    def is_moe(self, layer_idx: int) -> bool:
        """Layers 0 .. first_k_dense_replace - 1 are dense; every later one is a DeepSeekMoE layer."""
        return layer_idx >= self.first_k_dense_replace


# DeepSeek-V3's and Kimi K2's YaRN: 4k pretraining context stretched 40x / 32x.
_V3_YARN = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
_K2_YARN = {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, DeepseekV3Config] = {
    # CPU quick start, a few minutes on 2 cores: Llama 3's `tiny` width and depth; 1 dense layer then 3 MoE
    # layers of 8 routed experts (2 groups of 4, top-2 from 1 group) + 1 shared, all of width 64.
    "tiny": DeepseekV3Config(hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                             v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                             n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=256),
    # One GPU, Tiny Shakespeare: Llama 3's `shakespeare` width and depth with MLA and DeepSeekMoE.
    "shakespeare": DeepseekV3Config(hidden_size=384, intermediate_size=1024, moe_intermediate_size=128,
                                    num_hidden_layers=6, num_attention_heads=6, q_lora_rank=192, kv_lora_rank=64,
                                    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                                    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                                    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
                                    dropout=0.2),
    # The published shapes (deepseek-ai/DeepSeek-V3 and moonshotai/Kimi-K2-Instruct config.json).
    "deepseek-v3": DeepseekV3Config(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                                    n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
                                    max_position_embeddings=163840, rope_theta=10000.0, rope_scaling=_V3_YARN,
                                    bos_token_id=0, eos_token_id=1),
    "kimi-k2": DeepseekV3Config(vocab_size=163840, hidden_size=7168, intermediate_size=18432,
                                moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64,
                                q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
                                n_group=1, topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=1,
                                max_position_embeddings=131072, rope_theta=50000.0, rope_scaling=_K2_YARN,
                                bos_token_id=163584, eos_token_id=163585),
}


def preset(name: str) -> DeepseekV3Config:
    return dataclasses.replace(get_preset(PRESETS, name, "deepseek_v3"))


# ---- Hugging Face config.json <-> DeepseekV3Config --------------------------------------------

HF_MODEL_TYPE = "deepseek_v3"
HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")  # Kimi K2 is DeepSeek-V3's architecture under its own model_type
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
# Keys of a hub config.json that describe the checkpoint or the serving setup, not the function.
_IGNORED = ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
            "pad_token_id", "pretraining_tp", "ep_size", "moe_layer_freq", "aux_loss_alpha", "seq_aux",
            "num_nextn_predict_layers", "num_mtp_layers", "quantization_config", "qk_head_dim", "head_dim",
            "attention_dropout", "hidden_act", "scoring_func", "topk_method", "rope_parameters", "rope_scaling",
            "rope_theta")


def from_hf_config(d: dict, where: str = "config.json") -> DeepseekV3Config:
    """Read a Hugging Face DeepSeek-V3 / Kimi K2 config.json dict; refuse settings that would change the math."""
    if d.get("model_type") in HF_MODEL_TYPES:
        d = dict(d, model_type=HF_MODEL_TYPE)
    check_model_type(d, HF_MODEL_TYPE, where)
    for key, want in (("hidden_act", "silu"), ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                      ("moe_layer_freq", 1)):
        if d.get(key, want) != want:
            raise ValueError(f"{where}: {key}={d[key]!r} is not DeepSeek-V3's ({want!r}); this implementation "
                             f"computes only that")
    theta, kind, rope = read_hf_rope(d, ("default", "yarn"), where, "DeepSeek-V3")
    fields = {f.name for f in dataclasses.fields(DeepseekV3Config)}
    kwargs = {k: v for k, v in d.items() if k in fields and k not in _IGNORED}
    kwargs["rope_theta"] = theta
    kwargs["rope_scaling"] = ({k: v for k, v in rope.items() if k in YARN_KEYS + YARN_OPTIONAL}
                              if kind == "yarn" else None)
    if kwargs.get("rope_interleave") is None:
        kwargs.pop("rope_interleave", None)
    return config_from_dict(DeepseekV3Config, kwargs, where)


def to_hf_config(cfg: DeepseekV3Config) -> dict:
    """The config.json transformers' DeepseekV3ForCausalLM reads (legacy rope keys, read by v4 and v5).
    num_nextn_predict_layers is 0: our checkpoints carry no multi-token-prediction layer."""
    d = dataclasses.asdict(cfg)
    # routing_bias_update_speed and seq_aux_loss_alpha stay: transformers keeps keys it does not know as
    # plain attributes (neither changes the forward), and our loader reads them back.
    d.pop("dropout")
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = dict(cfg.rope_scaling, type="yarn")
    return {"model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE], "hidden_act": "silu",
            "num_nextn_predict_layers": 0, **d}

"""Mixtral configuration: Llama 3's config plus five fields for the sparse mixture of experts.

`MixtralConfig` subclasses `LlamaConfig`, so every attention, norm and RoPE field keeps its
meaning and its checks; the delta is the experts, the router's top-k, the two auxiliary loss
weights and where the balance loss is computed (per layer, or pooled as transformers does). `intermediate_size` is the hidden width of ONE expert (Mixtral-8x7B: 14336).
Field names follow Hugging Face's `MixtralConfig`, so a hub config.json reads straight in.
Paper: "Mixtral of Experts" (2024, arXiv:2401.04088).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from architectures.common.checkpoint import check_model_type
from architectures.utils.config import config_from_dict, get_preset
from architectures.llama3.config import LlamaConfig
from architectures.llama3.config import from_hf_config as llama_from_hf_config
from architectures.llama3.config import to_hf_config as llama_to_hf_config


@dataclass
class MixtralConfig(LlamaConfig):
    num_local_experts: int = 8  # E: experts in every MoE layer (each a SwiGLU of width intermediate_size)
    num_experts_per_tok: int = 2  # k: experts each token is routed to (top-k of the router's softmax)
    router_aux_loss_coef: float = 0.001  # alpha: weight of the load-balancing loss (transformers' default; Mixtral-8x7B ships 0.02)
    router_z_loss_coef: float = 0.0  # weight of the ST-MoE router z-loss (0: off, as in transformers' Mixtral)
    router_aux_loss_per_layer: bool = False  # balance each layer (Switch) instead of transformers' all-layers-pooled loss

    def __post_init__(self):
        super().__post_init__()
        if self.num_local_experts < 1:
            raise ValueError(f"num_local_experts must be >= 1, got {self.num_local_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_local_experts="
                f"{self.num_local_experts}: each token picks its top-k experts out of the E that exist; "
                f"lower --num-experts-per-tok or raise --num-local-experts"
            )
        if self.mlp_bias:
            raise ValueError("mlp_bias=True is not supported: Mixtral's experts and router have no biases")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (it weights a penalty), got {getattr(self, name)}")


PRESETS: dict[str, MixtralConfig] = {
    # CPU quick start: Llama 3's `tiny` with its SwiGLU (d_ff=384) split into 8 experts of 192, top-2,
    # so a token uses exactly as many feed-forward weights as in the dense model (matched active parameters).
    # Balance loss per layer: pooled over layers (transformers' way) it let 3 of 4 layers collapse (notes/mixtral.md).
    "tiny": MixtralConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, num_local_experts=8,
                          num_experts_per_tok=2, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
                          router_aux_loss_per_layer=True),
    # One GPU, Tiny Shakespeare: Llama 3's `shakespeare` (d_ff=1024) as 8 experts of 512, top-2.
    "shakespeare": MixtralConfig(hidden_size=384, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
                                 num_key_value_heads=2, max_position_embeddings=256, dropout=0.2,
                                 num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01,
                                 router_z_loss_coef=0.001, router_aux_loss_per_layer=True),
    # The published shape (mistralai/Mixtral-8x7B-v0.1 config.json): 46.7B parameters, 12.9B active per token.
    "mixtral-8x7b": MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                  rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                  num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02),
}


def preset(name: str) -> MixtralConfig:
    return dataclasses.replace(get_preset(PRESETS, name, "mixtral"))


# ---- Hugging Face config.json <-> MixtralConfig -----------------------------------------------

HF_MODEL_TYPE = "mixtral"
HF_ARCHITECTURE = "MixtralForCausalLM"
MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_z_loss_coef",
              "router_aux_loss_per_layer")


def from_hf_config(d: dict, where: str = "config.json") -> MixtralConfig:
    """Read a Hugging Face Mixtral config.json: Llama's mapping for the shared fields, then the MoE ones."""
    check_model_type(d, HF_MODEL_TYPE, where)
    if d.get("sliding_window") is not None:
        raise ValueError(
            f"{where}: sliding_window={d['sliding_window']} is not supported; Mixtral-8x7B attends to the whole "
            f"context (sliding_window null) and so does this implementation"
        )
    # router_jitter_noise (multiplicative input noise while training) is dropped: it never changes inference.
    moe = {k: d[k] for k in MOE_FIELDS if k in d}
    shared = {k: v for k, v in d.items() if k not in MOE_FIELDS}
    llama = llama_from_hf_config(dict(shared, model_type="llama"), where)
    return config_from_dict(MixtralConfig, {**dataclasses.asdict(llama), **moe}, where)


def to_hf_config(cfg: MixtralConfig) -> dict:
    """The config.json transformers' MixtralForCausalLM reads (router_z_loss_coef and router_aux_loss_per_layer
    are ours; transformers ignores them)."""
    d = llama_to_hf_config(cfg)
    return dict(d, model_type=HF_MODEL_TYPE, architectures=[HF_ARCHITECTURE], sliding_window=None)

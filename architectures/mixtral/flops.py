"""Total parameters, active parameters per token and training FLOPs of Mixtral, as the delta
from Llama 3's closed formulas (architectures/llama3/flops.py).

A Llama layer has one SwiGLU of 3*D*F weights; a Mixtral layer has E of them plus a D*E
router, of which a token uses k. So, per layer:

    total  = Llama + (E - 1) * 3*D*F + D*E
    active = Llama + (k - 1) * 3*D*F + D*E

Mixtral-8x7B (D=4096, F=14336, L=32, E=8, k=2): 46.70B total, 12.88B active; checked by
tests/architectures/mixtral/test_parameters_and_flops.py against `sum(p.numel())` and the published
figures (46.7B / 12.9B), and written out in notes/mixtral.md.
"""

from __future__ import annotations

from architectures.llama3 import flops as llama
from architectures.mixtral.config import MixtralConfig


def _expert(cfg: MixtralConfig) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size  # W_gate, W_up, W_down of one expert


def _router(cfg: MixtralConfig) -> int:
    return cfg.hidden_size * cfg.num_local_experts  # W_router: D -> E logits


def count_parameters(cfg: MixtralConfig) -> int:
    """Every parameter stored: Llama's count with E experts and a router in place of one SwiGLU."""
    extra = (cfg.num_local_experts - 1) * _expert(cfg) + _router(cfg)
    return llama.count_parameters(cfg) + cfg.num_hidden_layers * extra


def active_parameters(cfg: MixtralConfig) -> int:
    """Parameters one token touches: k experts and the router per layer (embedding row and head included)."""
    extra = (cfg.num_experts_per_tok - 1) * _expert(cfg) + _router(cfg)
    return llama.count_parameters(cfg) + cfg.num_hidden_layers * extra


def active_matmul_weights(cfg: MixtralConfig) -> int:
    """Weights in a matmul per token: Llama's (one SwiGLU) + (k - 1) more experts + the router."""
    extra = (cfg.num_experts_per_tok - 1) * _expert(cfg) + _router(cfg)
    return llama.matmul_weights(cfg) + cfg.num_hidden_layers * extra


def flops_per_token(cfg: MixtralConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, matmuls only): Llama's formula
    with the active matmul weights. Softmax, top-k, sorting and gathers are not counted: they
    move memory but do O(E) and O(D) work per token, not O(D*F)."""
    extra = active_matmul_weights(cfg) - llama.matmul_weights(cfg)
    return llama.flops_per_token(cfg, seq_len) + 3 * 2 * extra

"""The CLIP text transformer: the prompt's token ids -> one hidden state per token, which the
U-Net's cross-attention reads.

A GPT-2-like stack (learned position embeddings, pre-LayerNorm blocks, a causal mask, a final
LayerNorm), named as transformers' `CLIPTextModel` names its weights (`text_model.embeddings...`,
`text_model.encoder.layers.i.self_attn.q_proj`, `text_model.final_layer_norm`), so a pipeline's
`text_encoder/` loads by name. SD 1.x conditions on the last hidden states of all 77 positions,
padding included, not on the pooled vector CLIP's contrastive head uses.

    text_encoder(input_ids) -> last hidden states      (B, T) -> (B, T, hidden_size)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.stable_diffusion.config import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x), kept by every CLIP checkpoint."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, d) -> (B, heads, T, d / heads) for each of q, k, v
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i reads tokens 0..i
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, T, d)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, d)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, T <= max_position_embeddings -> (B, T, hidden_size) last hidden states."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"a prompt of {input_ids.shape[1]} tokens is longer than the text encoder's context of "
                             f"{self.config.max_position_embeddings}; shorten the prompt")
        tm = self.text_model
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)

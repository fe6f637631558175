"""Shared fixtures: a tiny random Llama 3 and a batch of prompts of different lengths."""

import pytest
import torch

from architectures.llama3 import Llama3, LlamaConfig


def tiny_config(**kw) -> LlamaConfig:
    # initializer_range=0.2 spreads the logits, so greedy argmaxes are far from ties and the
    # fp32 rounding differences between cache layouts (~1e-7) cannot flip a token.
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def model():
    torch.manual_seed(0)
    return Llama3(tiny_config()).eval()


@pytest.fixture(scope="session")
def prompts():
    """Lengths around block boundaries (block_size 4 in the tests), and a one-token prompt."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 17, 33, 1, 40, 16, 8)]

"""fundamentals/attention.py against PyTorch's attention and the zoo's `causal_attention`."""

import math

import pytest
import torch
import torch.nn.functional as F

from architectures.common.attention import causal_attention
from fundamentals.attention import (Block, MultiHeadAttention, attention, causal_mask, sliding_window_mask,
                                    soft_lookup)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64) for _ in range(3)]  # (B, H, T, d)


def test_soft_lookup_becomes_a_dictionary_read_when_one_key_dominates():
    keys = torch.eye(4, dtype=torch.float64)  # four orthogonal keys
    values = torch.arange(12, dtype=torch.float64).view(4, 3)
    assert torch.allclose(soft_lookup(30 * keys[2], keys, values), values[2])  # weight ~1 on key 2
    assert torch.allclose(soft_lookup(torch.zeros(4, dtype=torch.float64), keys, values), values.mean(0))


def test_attention_equals_torch_sdpa(qkv):
    q, k, v = qkv
    assert torch.allclose(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert torch.allclose(attention(q, k, v, causal_mask(11)), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    window = sliding_window_mask(11, 4)
    assert torch.allclose(attention(q, k, v, window), F.scaled_dot_product_attention(q, k, v, attn_mask=window))


def test_attention_equals_the_zoos_causal_attention(qkv):
    q, k, v = qkv
    scale = 1 / math.sqrt(q.shape[-1])
    assert torch.allclose(attention(q, k, v, causal_mask(11)), causal_attention(q, k, v, scale))
    assert torch.allclose(attention(q, k, v, sliding_window_mask(11, 4)), causal_attention(q, k, v, scale, window=4))


def test_masks():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert sliding_window_mask(4, 2).tolist() == [[True, False, False, False], [True, True, False, False],
                                                  [False, True, True, False], [False, False, True, True]]
    assert torch.equal(sliding_window_mask(6, 6), causal_mask(6))  # a window as long as the text is no window


def test_weights_are_a_distribution_over_the_visible_keys(qkv):
    q, k, v = qkv
    _, weights = attention(q, k, v, causal_mask(11), return_weights=True)
    assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert (weights.triu(1) == 0).all()  # no weight on a future key


@pytest.mark.parametrize("causal", [True, False])
def test_multi_head_attention_equals_torch_multihead_attention(causal):
    torch.manual_seed(0)
    ours = MultiHeadAttention(dim=16, num_heads=4, causal=causal).double()
    theirs = torch.nn.MultiheadAttention(16, 4, bias=False, batch_first=True).double()
    with torch.no_grad():  # theirs keeps W_Q, W_K, W_V stacked in one matrix
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.out_proj.weight.copy_(ours.o_proj.weight)
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    mask = ~causal_mask(9) if causal else None  # torch's bool mask marks what is HIDDEN
    expected, _ = theirs(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.allclose(ours(x), expected)


def test_a_block_never_reads_the_future():
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=4).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 6:] += torch.randn(1, 4, 16, dtype=torch.float64)  # change positions 6..9 only
    assert torch.allclose(block(x)[:, :6], block(changed)[:, :6])
    assert not torch.allclose(block(x)[:, 6:], block(changed)[:, 6:])


def test_a_block_with_zero_output_layers_is_the_identity():
    block = Block(dim=16, num_heads=4)
    with torch.no_grad():  # the residual stream passes unchanged when the sublayers add nothing
        block.attn.o_proj.weight.zero_()
        block.mlp[2].weight.zero_()
    x = torch.randn(2, 5, 16)
    assert torch.equal(block(x), x)


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiHeadAttention(dim=10, num_heads=4)


def test_without_positions_attention_ignores_word_order():
    # No mask, no positions: permuting the tokens only permutes the outputs (RoPE is what adds order).
    torch.manual_seed(0)
    mha = MultiHeadAttention(dim=16, num_heads=4, causal=False).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    order = torch.randperm(7)
    assert torch.allclose(mha(x[:, order]), mha(x)[:, order])

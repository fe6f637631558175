"""The answers to the exercises of notes/gemma.md, computed from the zoo's code and compared with the hints
the note gives."""

import math

import torch
import torch.nn.functional as F

from architectures.common.attention import sliding_window_mask, softcapped_attention
from architectures.common.decoder import softcap_logits
from architectures.gemma import Gemma
from architectures.gemma.config import GemmaConfig, preset
from architectures.gemma.experiments.local_global import cache_specs, kv_bytes
from architectures.gemma.flops import mean_keys
from architectures.gemma.model import ScaledEmbedding


def test_gemma_3_1b_kv_bytes_at_8k_tokens(hints):
    specs = cache_specs("gemma-3-1b")
    cfg = preset("gemma-3-1b")
    per_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16
    assert per_token_layer == 1024
    n_global = sum(s.window is None for s in specs)
    assert (n_global, len(specs) - n_global, {s.window for s in specs}) == (4, 22, {None, 512})
    local_global, all_global = kv_bytes(specs, 8192), kv_bytes(specs, 8192, windows=False)
    assert local_global == 4 * 8192 * 1024 + 22 * 512 * 1024 == 45_088_768
    assert all_global == 26 * 8192 * 1024 == 218_103_808
    assert (local_global // 2**20, all_global // 2**20, f"{all_global / local_global:.1f}") == (43, 208, "4.8")
    text = hints("gemma")
    assert "4 x 8,192 x 1,024 + 22 x 512 x 1,024 = 45,088,768 bytes (43 MiB)" in text
    assert "26 x 8,192 x 1,024 = 218,103,808 bytes (208 MiB), 4.8 times more" in text


def one_token_changed(ids: torch.Tensor, position: int) -> torch.Tensor:
    changed = ids.clone()
    changed[0, position] = (changed[0, position] + 1) % 50
    return changed


def test_which_positions_a_local_query_sees(hints):
    mask = sliding_window_mask(80, 32)
    assert mask[40].nonzero().flatten().tolist() == list(range(9, 41))  # a local layer, W = 32
    assert sliding_window_mask(80, None)[40].nonzero().flatten().tolist() == list(range(0, 41))
    assert preset("tiny").sliding_window == 32
    # The same answer from the model: which input tokens change the output at a position, through one
    # local layer (keys 9..40 for position 40) and through two stacked ones (inputs 8..70 for position 70).
    for layers, p, first in ((1, 40, 9), (2, 70, 8)):
        torch.manual_seed(0)
        model = Gemma(GemmaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=80,
                                  sliding_window=32, layer_types=["sliding_attention"] * layers,
                                  query_pre_attn_scalar=16, initializer_range=0.2)).eval()
        ids = torch.randint(0, 50, (1, p + 1), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            base = model(ids)[0, p]
            unseen = model(one_token_changed(ids, first - 1))[0, p]
            seen = model(one_token_changed(ids, first))[0, p]
        torch.testing.assert_close(unseen, base, rtol=1e-6, atol=1e-6)
        assert (seen - base).abs().max() > 1e-4
    text = hints("gemma")
    assert "the keys at 9 .. 40 (32 of them); a global layer's all of 0 .. 40" in text
    assert "inputs 8 .. 70 (70 - 2 x 31 = 8)" in text


def test_mean_keys_of_a_local_and_a_global_layer(hints):
    counted_local = sliding_window_mask(128, 32).sum().item() / 128
    counted_global = sliding_window_mask(128, None).sum().item() / 128
    assert counted_local == mean_keys(128, 32) == 28.125
    assert counted_global == mean_keys(128, None) == 64.5
    tiny = preset("tiny")
    per_row = sum(mean_keys(128, tiny.window(i)) for i in range(tiny.num_hidden_layers))
    assert per_row == 5 * 28.125 + 64.5 == 205.125  # against 6 x 64.5 = 387 with every layer global
    text = hints("gemma")
    assert "(32 x 33 / 2 + 96 x 32) / 128 = 28.125 keys; a global layer's 129 / 2 = 64.5" in text
    assert "5 x 28.125 + 64.5 = 205.125 against 6 x 64.5 = 387" in text


def test_soft_cap_values_and_gradients(hints):
    def value_and_slope(s: float, cap: float) -> tuple[float, float]:
        x = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        y = softcap_logits(x, cap)
        y.backward()
        return y.item(), x.grad.item()

    logit, logit_slope = value_and_slope(60.0, 30.0)
    score, score_slope = value_and_slope(25.0, 50.0)
    assert (f"{logit:.2f}", f"{logit_slope:.3f}") == ("28.92", "0.071")
    assert (f"{score:.2f}", f"{score_slope:.3f}") == ("23.11", "0.786")
    assert math.isclose(logit_slope, 1 - math.tanh(2) ** 2) and math.isclose(score_slope, 1 - math.tanh(0.5) ** 2)
    # The attention cap is the same function, applied to the scaled scores before the softmax.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) * 4 for _ in range(3))  # fp32, as the layer computes
    mask = sliding_window_mask(5, 3)
    scores = softcap_logits(q @ k.transpose(-1, -2) * 8 ** -0.5, 2.0).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(softcapped_attention(q, k, v, mask, 8 ** -0.5, 2.0), F.softmax(scores, -1) @ v)
    text = hints("gemma")
    assert "30 tanh(2) = 28.92, its gradient multiplied by 1 - tanh²(2) = 0.071" in text
    assert "50 tanh(0.5) = 23.11, multiplied by 0.786" in text


def test_embedding_factor_and_attention_scale(hints):
    emb = ScaledEmbedding(3, 1152)
    torch.nn.init.ones_(emb.weight)
    ids = torch.tensor([[0]])
    assert emb.to(torch.bfloat16)(ids)[0, 0, 0].item() == 34.0
    assert f"{emb.float()(ids)[0, 0, 0].item():.2f}" == "33.94"
    with torch.device("meta"):
        big = Gemma(preset("gemma-3-27b"))
    attn = big.model.layers[0].self_attn
    assert (attn.head_dim, f"{attn.scale:.4f}", f"{attn.head_dim ** -0.5:.4f}") == (128, "0.0772", "0.0884")
    text = hints("gemma")
    assert "34.0 in bf16 against 33.94 in fp32" in text
    assert "168 ** -0.5 = 0.0772, not 128 ** -0.5 = 0.0884" in text

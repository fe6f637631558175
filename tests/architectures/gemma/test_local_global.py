"""The figures of notes/gemma.md: the KV arithmetic from the presets' cache declarations, the soft-cap's
gradient, and the command that draws them."""

import json

import pytest
import torch

from architectures.gemma.experiments.local_global import cache_specs, kv_bytes, main, softcap_curves


def test_gemma_3_1b_kv_bytes_at_32k_tokens_from_its_cache_declarations():
    """4 global and 22 local layers of one KV head of 256, bf16 (1,024 bytes of K and V per token and
    layer), a 512-token window: 4 * 32768 * 1024 + 22 * 512 * 1024 bytes, against 26 * 32768 * 1024."""
    specs = cache_specs("gemma-3-1b")
    assert sum(s.window is None for s in specs) == 4 and {s.window for s in specs} == {None, 512}
    assert kv_bytes(specs, 32768) == 4 * 32768 * 1024 + 22 * 512 * 1024 == 145_752_064
    assert kv_bytes(specs, 32768, windows=False) == 26 * 32768 * 1024 == 872_415_232
    assert kv_bytes(specs, 300) == kv_bytes(specs, 300, windows=False)  # shorter than the window: no saving


def test_softcap_gradient_is_one_minus_tanh_squared():
    s, capped, grad = softcap_curves(30.0, n=41)
    torch.testing.assert_close(grad, 1 - torch.tanh(s / 30.0) ** 2)
    assert capped.abs().max() < 30.0 and grad[20] == 1.0  # at s = 0 the cap changes nothing


@pytest.mark.slow
def test_the_command_draws_the_three_figures(tmp_path):
    results = main(["--out", str(tmp_path)])
    for name in ("gemma-masks.png", "gemma-kv-bytes.png", "gemma-softcap.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bytes"]["gemma-3-1b"]["32768"] == {"local_global": 145_752_064, "all_global": 872_415_232}
    assert results["bytes"]["gemma-2-2b"][8192]["all_global"] == 26 * 8192 * 2 * 4 * 256 * 2

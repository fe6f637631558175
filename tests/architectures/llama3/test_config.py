"""Llama 3's feed-forward width: `llama3_intermediate_size` is Meta's rule, and the published presets
carry what it gives. The rule's inputs (ffn_dim_multiplier, multiple_of) come from each model's
params.json in Meta's release; the expected widths are read from our preset table, which copies the
hub's config.json."""

import pytest

from architectures.llama3.config import PRESETS, llama3_intermediate_size

# preset name -> (ffn_dim_multiplier, multiple_of) of Meta's params.json for that model
PUBLISHED = {
    "llama-3.1-8b": (1.3, 1024),
    "llama-3.2-1b": (1.5, 256),
    "llama-3.2-3b": (1.0, 256),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_rule_reproduces_the_published_intermediate_size(name):
    cfg = PRESETS[name]
    assert llama3_intermediate_size(cfg.hidden_size, *PUBLISHED[name]) == cfg.intermediate_size


def test_rule_on_the_published_figures():
    assert llama3_intermediate_size(4096, 1.3, 1024) == 14336  # Llama 3 8B: int(1.3 * 10922) = 14198, up to 14 x 1024
    assert llama3_intermediate_size(2048, 1.5, 256) == 8192  # Llama 3.2 1B: int(1.5 * 5461) = 8191, up to 32 x 256
    assert llama3_intermediate_size(3072, 1.0, 256) == 8192  # Llama 3.2 3B: 8D/3 = 8192 exactly


def test_our_presets_are_chosen_not_derived():
    """notes/llama3.md says which of our presets the rule gives; this keeps the note honest."""
    for name in ("shakespeare", "gpt2-124m"):
        cfg = PRESETS[name]
        assert llama3_intermediate_size(cfg.hidden_size, 1.0, 256) == cfg.intermediate_size == 8 * cfg.hidden_size // 3
    tiny = PRESETS["tiny"]
    assert tiny.intermediate_size == 3 * tiny.hidden_size == 384
    assert llama3_intermediate_size(tiny.hidden_size, 1.0, 256) == 512

"""Bad input to Llama 3 gets an error that says what is wrong and how to fix it.

Bad checkpoints every family must refuse (truncated, corrupted, a missing shard or config.json,
another family's config.json) are checked in tests/architectures/test_conformance.py."""

import re

import pytest
import torch

from architectures.utils.config import apply_overrides, config_from_dict
from architectures.llama3 import Llama3, LlamaConfig, from_pretrained, preset, save_pretrained
from architectures.llama3.train import main as train_main


def small(**kw):
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Llama3(small()), tmp_path)
    return tmp_path


def test_unknown_preset_lists_the_presets(command_error):
    with pytest.raises(ValueError, match=r"unknown llama3 preset 'huge'.*'tiny'"):
        preset("huge")
    assert re.search(r"unknown preset 'huge'.*shakespeare", command_error(train_main, ["--preset", "huge"]))


def test_unknown_config_field_lists_valid_fields(command_error):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layers'\].*num_hidden_layers"):
        config_from_dict(LlamaConfig, {"n_layers": 4})
    assert re.search(r"unknown option --n-layers.*--num-hidden-layers",
                     command_error(train_main, ["--preset", "tiny", "--n-layers", "4"]))


def test_value_of_wrong_type_names_field_and_type(command_error):
    with pytest.raises(TypeError, match=r"'hidden_size' must be int, got str"):
        config_from_dict(LlamaConfig, {"hidden_size": "128"})
    with pytest.raises(TypeError, match=r"'tie_word_embeddings' must be bool, got int"):
        config_from_dict(LlamaConfig, {"tie_word_embeddings": 1})
    with pytest.raises(TypeError, match=r"--num-hidden-layers expects int, got 'four'"):
        apply_overrides(preset("tiny"), {"num-hidden-layers": "four"})
    assert re.search(r"--lr expects float, got 'fast'", command_error(train_main, ["--preset", "tiny", "--lr", "fast"]))


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        small(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads"):
        small(num_attention_heads=4, num_key_value_heads=3)


def test_token_ids_outside_vocabulary():
    model = Llama3(small()).eval()
    with pytest.raises(ValueError, match=r"token id 50 is outside the vocabulary \[0, 50\)"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(torch.tensor([[-1, 2]]))


def test_sequence_longer_than_maximum():
    model = Llama3(small()).eval()
    with pytest.raises(ValueError, match="sequence of 33 tokens exceeds max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_input_of_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        Llama3(small())(torch.zeros(5, dtype=torch.long))


def test_config_that_does_not_match_weights_names_every_tensor(checkpoint, edit_config):
    """Llama's tensor names in the error (tests/architectures/test_conformance.py checks every family
    for a layer more or less, a missing tensor and a wrong shape)."""
    edit_config(checkpoint, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.input_layernorm.weight'.*mlp.down_proj"):
        from_pretrained(checkpoint)
    edit_config(checkpoint, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.1.input_layernorm.weight'"):
        from_pretrained(checkpoint)
    edit_config(checkpoint, num_hidden_layers=2, intermediate_size=65)
    with pytest.raises(ValueError, match=r"shape mismatches.*mlp.down_proj.weight: checkpoint \(32, 64\) vs model \(32, 65\)"):
        from_pretrained(checkpoint)


def test_unsupported_rope_type_is_rejected(checkpoint, edit_config):
    edit_config(checkpoint, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        from_pretrained(checkpoint)


def test_dataset_too_small_for_block_size(tmp_path, monkeypatch, command_error):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "small.txt"
    corpus.write_text("To be, or not to be: that is the question.\n" * 40)
    assert "block" in command_error(train_main, ["--preset", "tiny", "--dataset", str(corpus), "--tokenizer", "char",
                                                 "--max-steps", "1", "--out", str(tmp_path / "run"), "--block-size", "200"])

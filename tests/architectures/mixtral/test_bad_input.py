"""Bad input to Mixtral gets an error that says what is wrong and how to fix it.

Bad checkpoints every family must refuse (another family's config.json among them) are checked in
tests/architectures/test_conformance.py."""


import pytest
import torch
import transformers

from architectures.mixtral import Mixtral, MixtralConfig, from_pretrained, preset, save_pretrained
from architectures.mixtral.train import main as train_main


def small(**kw):
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)
    return MixtralConfig(**{**base, **kw})


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Mixtral(small()), tmp_path)
    return tmp_path


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_top_k_outside_one_to_num_experts(top_k):
    with pytest.raises(ValueError, match=rf"num_experts_per_tok={top_k} must be between 1 and num_local_experts=4"):
        small(num_experts_per_tok=top_k)


def test_top_k_error_reaches_the_command_line_and_config_json(checkpoint, edit_config, command_error):
    assert "num_experts_per_tok=9 must be between 1 and num_local_experts=8" in \
        command_error(train_main, ["--preset", "tiny", "--num-experts-per-tok", "9"])
    edit_config(checkpoint, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1"):
        from_pretrained(checkpoint)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown mixtral preset 'huge'.*'mixtral-8x7b'"):
        preset("huge")


def test_checkpoint_missing_an_experts_weights_names_them(tmp_path):
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4,
    )).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"expert weights missing.*\['model.layers.1.block_sparse_moe.experts.2.w3.weight'\]"):
        from_pretrained(tmp_path)


def test_checkpoint_with_fewer_experts_than_config_names_each_missing_one(checkpoint, edit_config):
    edit_config(checkpoint, num_local_experts=5)
    with pytest.raises(ValueError, match=r"experts.4.w1.weight.*num_local_experts=5"):
        from_pretrained(checkpoint)
    edit_config(checkpoint, num_local_experts=3)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.block_sparse_moe.experts.3.w1.weight'"):
        from_pretrained(checkpoint)


def test_expert_of_the_wrong_width_is_a_shape_mismatch(checkpoint, edit_config):
    edit_config(checkpoint, intermediate_size=40)
    with pytest.raises(ValueError, match=r"shape mismatches.*mlp.experts.down_proj: checkpoint \(4, 32, 48\) vs model \(4, 32, 40\)"):
        from_pretrained(checkpoint)


def test_router_with_nan_weights_is_reported_by_layer(checkpoint):
    model = from_pretrained(checkpoint)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[2, 5] = float("nan")
    with pytest.raises(FloatingPointError,
                       match=r"router of layer 1 produced NaN/inf logits for 7 of 7 tokens.*"
                             r"model.layers.1.mlp.gate.weight holds 1 NaN/inf values"):
        model(torch.randint(0, 50, (1, 7)))


def test_nan_hidden_states_reaching_a_router_are_told_apart_from_a_broken_router(checkpoint):
    model = from_pretrained(checkpoint)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"router of layer 0 .* hidden states reaching it already were not"):
        model(torch.randint(0, 50, (1, 7)))


def test_sliding_window_attention_is_rejected(checkpoint, edit_config):
    edit_config(checkpoint, sliding_window=4096)
    with pytest.raises(ValueError, match="sliding_window=4096 is not supported"):
        from_pretrained(checkpoint)


def test_expert_biases_are_rejected():
    with pytest.raises(ValueError, match="experts and router have no biases"):
        small(mlp_bias=True)

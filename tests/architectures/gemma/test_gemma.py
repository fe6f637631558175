"""What only Gemma has, beyond the conformance table (tests/architectures/test_conformance.py): the
config's defaults and presets against transformers', local windows and soft-caps that change the
function, generation past the window through every cache, multimodal Gemma 3 checkpoints, bad input."""

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from architectures import registry
from architectures.gemma import Gemma, GemmaConfig, from_pretrained, preset
from architectures.gemma.config import HF_DEFAULTS, from_hf_config, to_hf_config
from architectures.gemma.flops import count_parameters, flops_per_token, matmul_weights
from inference.batched import generate_batch
from inference.sampling import SamplingParams, generate


def tiny(**kw) -> GemmaConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4,
                sliding_window_pattern=2, query_pre_attn_scalar=8, initializer_range=0.2)
    return GemmaConfig(**{**base, **kw})


def model_of(cfg: GemmaConfig, seed: int = 0) -> Gemma:
    torch.manual_seed(seed)
    model = Gemma(cfg).eval()
    with torch.no_grad():  # norms away from their zero init, so a (1 + w) slip would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("model_type,hf_class", [("gemma2", transformers.Gemma2Config),
                                                 ("gemma3_text", transformers.Gemma3TextConfig)])
def test_defaults_for_keys_config_json_leaves_out_are_transformers(model_type, hf_class):
    hf = hf_class()
    for key, value in HF_DEFAULTS[model_type].items():
        if key in ("rope_theta", "rope_local_base_freq", "sliding_window_pattern"):
            continue
        assert getattr(hf, key) == value, key
    theta = hf.rope_parameters["full_attention" if model_type == "gemma3_text" else "rope_theta"]
    assert (theta["rope_theta"] if model_type == "gemma3_text" else theta) == HF_DEFAULTS[model_type]["rope_theta"]
    ours = from_hf_config({"model_type": model_type})  # every key left out: transformers' defaults
    assert ours.layer_types == hf.layer_types


@pytest.mark.parametrize("name,params", [("gemma-2-2b", 2_614_341_888), ("gemma-3-1b", 999_885_952)])
def test_published_presets_have_the_published_parameter_counts_and_build_in_transformers(name, params):
    cfg = preset(name)
    assert count_parameters(cfg) == params
    d = to_hf_config(cfg)
    hf_cfg = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == params
    assert hf_cfg.layer_types == cfg.layer_types


def test_gemma_3_presets_are_five_local_layers_to_one_global():
    assert [i for i, t in enumerate(preset("gemma-3-1b").layer_types) if t == "full_attention"] == [5, 11, 17, 23]
    big = preset("gemma-3-27b")
    assert big.layer_types.count("full_attention") == 10 and big.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert preset("gemma-2-2b").layer_types[:4] == ["sliding_attention", "full_attention"] * 2


def test_parameter_and_flop_formulas_count_the_model():
    cfg = tiny(model_type="gemma3_text", tie_word_embeddings=False)
    assert count_parameters(cfg) == Gemma(cfg).num_parameters()
    T = 10  # local layers see min(t + 1, 4) keys, global ones t + 1
    keys = sum(sum(min(t + 1, cfg.window(i) or T) for t in range(T)) for i in range(cfg.num_hidden_layers)) / T
    want = 3 * (2 * matmul_weights(cfg) + 4 * cfg.num_attention_heads * cfg.head_dim * keys)
    assert flops_per_token(cfg, T) == pytest.approx(want)
    assert flops_per_token(cfg, T) < flops_per_token(dataclasses.replace(cfg, sliding_window=T), T)


@pytest.mark.parametrize("change", [dict(sliding_window=64), dict(attn_logit_softcapping=None, model_type="gemma2"),
                                    dict(final_logit_softcapping=None, model_type="gemma2")])
def test_windows_and_soft_caps_change_the_function(change):
    """Each feature matters at the sizes the conformance table uses, so matching transformers there tests it."""
    cfg = tiny(model_type="gemma2", attn_logit_softcapping=1.0, final_logit_softcapping=2.0)
    ids = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(0))
    a, b = model_of(cfg), model_of(dataclasses.replace(cfg, **change))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_greedy_generation_past_three_windows_is_the_same_with_and_without_a_cache(model_type):
    cfg = tiny(model_type=model_type, **({"attn_logit_softcapping": 5.0} if model_type == "gemma2" else {}))
    model = model_of(cfg)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
    prompts = [[3, 9, 27, 4, 1], [7, 7, 2]]  # 5 + 20 and 3 + 20 tokens: past 3 x the window of 4
    for prompt in prompts:
        assert generate(model, prompt, greedy, use_cache=True) == generate(model, prompt, greedy, use_cache=False)
    # A batch of unequal prompts: left padding, and each local layer's window counted without it.
    batched = generate_batch(model, prompts, greedy)
    assert batched == [generate(model, p, greedy, use_cache=False) for p in prompts]


def test_multimodal_gemma3_checkpoint_loads_its_text_model_in_both_layouts(tmp_path):
    torch.manual_seed(0)
    text = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, query_pre_attn_scalar=16,
                sliding_window=4, sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 8.0},
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=96, boi_token_index=94, eoi_token_index=95,
                                    attn_implementation="eager")
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    ids = torch.randint(0, 90, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        ours = registry.from_pretrained(tmp_path)
        assert isinstance(ours, Gemma) and ours.config.vocab_size == 97
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
        # transformers saves the hub's layout (language_model.model.*, vision_tower.*); its in-memory names
        # (model.language_model.*, model.vision_tower.*) load too.
        state = load_file(tmp_path / "model.safetensors")
        assert any(k.startswith("language_model.model.layers.") for k in state)
        assert any(k.startswith("vision_tower.") for k in state)
        renamed = {k.replace("language_model.model.", "model.language_model.").replace("vision_tower.", "model.vision_tower.")
                   .replace("multi_modal_projector.", "model.multi_modal_projector."): v for k, v in state.items()}
        save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
        torch.testing.assert_close(from_pretrained(tmp_path)(ids), expected, rtol=1e-4, atol=1e-4)


def write_checkpoint(directory, cfg: GemmaConfig):
    registry.family("gemma").save_pretrained(model_of(cfg), directory)
    return json.loads((directory / "config.json").read_text())


def test_bad_layer_types_window_and_weights_are_named(tmp_path, edit_config):
    config = write_checkpoint(tmp_path, tiny(model_type="gemma3_text"))
    edit_config(tmp_path, layer_types=["sliding_attention", "chunked_attention", "full_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"layer_types has unknown entry \['chunked_attention'\].*'sliding_attention'"):
        from_pretrained(tmp_path)
    edit_config(tmp_path, layer_types=config["layer_types"][:3])
    with pytest.raises(ValueError, match=r"layer_types must list one type per layer, 4 of them"):
        from_pretrained(tmp_path)
    for window in (0, -3):
        edit_config(tmp_path, layer_types=config["layer_types"], sliding_window=window)
        with pytest.raises(ValueError, match=rf"sliding_window must be a positive number of tokens, got {window}"):
            from_pretrained(tmp_path)
    # Gemma 3 weights under a Gemma 2 config: the QK-norms have no place, and are named.
    edit_config(tmp_path, sliding_window=4, model_type="gemma2", rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"unexpected tensors \[.*'model\.layers\.0\.self_attn\.k_norm\.weight'"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("fields,message", [
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), "Gemma3ForCausalLM ignores it"),
    (dict(model_type="gemma2", rope_local_base_freq=5.0), "Gemma 2 has one RoPE table"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling=.* is not supported"),
    (dict(final_logit_softcapping=0.0), "final_logit_softcapping must be positive or None"),
    (dict(model_type="gemma4"), "model_type must be one of"),
])
def test_configs_that_would_change_the_function_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny(**fields)


def test_config_json_of_an_encoder_or_another_activation_is_refused():
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        from_hf_config({"model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="hidden_activation='silu'"):
        from_hf_config({"model_type": "gemma2", "hidden_activation": "silu"})
    with pytest.raises(ValueError, match="text_config"):
        from_hf_config({"model_type": "gemma3"})

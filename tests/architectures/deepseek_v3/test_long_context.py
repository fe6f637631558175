"""The context-extension experiment (architectures/deepseek_v3/experiments/long_context.py): its helpers, the
models its configs build, and the script end to end on a few steps."""

import json
import math

import pytest
import torch

from architectures.common.rope import default_inverse_frequencies, yarn_inverse_frequencies
from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config
from architectures.deepseek_v3.experiments.long_context import (ABLATIONS, METHODS, ScaledRopeConfig, bucket_nats_per_char,
                                                    extend, extended_config, main, nats_per_char, position_losses,
                                                    validation_windows)
from training.lm import evaluate_split


def small_model(context=32, **kw) -> DeepseekV3:
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                           qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=context, initializer_range=0.2, **kw)
    return DeepseekV3(cfg).eval()


def test_per_position_losses_average_to_the_plain_cross_entropy():
    """position_losses reads the windows evaluate_split reads; their mean is its nats/token (fp32, 1e-6)."""
    model = small_model()
    tokens = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(1))
    rows = validation_windows(tokens, 32)  # (9, 33)
    nats = position_losses(model, rows, batch_size=4)
    assert nats.shape == (9, 32)
    assert nats.mean().item() == pytest.approx(evaluate_split(model, tokens, 32, batch_size=5), rel=1e-6)


def test_nats_per_char_weighs_each_target_by_its_characters():
    nats = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    chars = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.0]])
    assert bucket_nats_per_char(nats, chars, 2) == pytest.approx([(1 + 2 + 5 + 6) / 6, (3 + 4 + 7 + 8) / 8])
    assert nats_per_char(nats, chars) == pytest.approx(36 / 14)  # all of it: total nats / total characters
    # one character per token: nats/char is nats/token
    assert bucket_nats_per_char(nats, torch.ones_like(nats), 4) == pytest.approx([nats.mean().item()])


def test_no_change_keeps_the_function_within_the_trained_context():
    """'none' raises max_position_embeddings only: the first 32 positions' logits are the trained model's."""
    base = small_model()
    longer = extend(base, "none", 128).eval()
    assert type(longer.config) is DeepseekV3Config and longer.config.max_position_embeddings == 128
    assert longer.config.rope_scaling is None
    x = torch.randint(0, 50, (2, 128), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(longer(x)[:, :32], base(x[:, :32]), rtol=1e-5, atol=1e-5)


def test_position_interpolation_turns_position_4p_as_the_trained_model_turned_p():
    base = small_model()
    pi = extend(base, "pi", 128)
    assert isinstance(pi.config, ScaledRopeConfig)
    assert pi.config.rope_parameters == {"rope_type": "linear", "factor": 4.0}
    torch.testing.assert_close(pi.model.rotary_emb.inv_freq, default_inverse_frequencies(8, 10000.0) / 4)
    p = torch.arange(32)[None]
    cos, sin = base.model.rotary_emb(p)
    cos4, sin4 = pi.model.rotary_emb(4 * p)
    torch.testing.assert_close(cos4, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin4, sin, rtol=0, atol=1e-6)
    # the weights are the trained ones; only the tables changed
    for (name, a), b in zip(base.state_dict().items(), pi.state_dict().values()):
        assert torch.equal(a, b), name


def test_yarn_extension_uses_deepseeks_frequencies_and_softmax_scale():
    """DeepSeek's settings (mscale = mscale_all_dim = 1): the cos/sin tables are not scaled, and the
    softmax scale of every layer is mscale(4)^2 / sqrt(d_h + d_h^R), mscale(4) = 0.1 ln 4 + 1."""
    base = small_model()
    yarn = extend(base, "yarn", 128)
    assert type(yarn.config) is DeepseekV3Config
    assert yarn.config.rope_scaling == {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    torch.testing.assert_close(yarn.model.rotary_emb.inv_freq, yarn_inverse_frequencies(8, 10000.0, 4.0, 32, 32, 1))
    assert yarn.model.rotary_emb.attention_factor == 1.0
    m = 0.1 * math.log(4) + 1
    for layer, trained in zip(yarn.model.layers, base.model.layers):
        assert layer.self_attn.scale == pytest.approx(m * m / math.sqrt(16))
        assert trained.self_attn.scale == pytest.approx(1 / math.sqrt(16))
    only_freqs = extend(base, "yarn_frequencies_only", 128)
    assert only_freqs.model.layers[0].self_attn.scale == pytest.approx(1 / math.sqrt(16))
    assert only_freqs.model.rotary_emb.attention_factor == 1.0
    torch.testing.assert_close(only_freqs.model.rotary_emb.inv_freq, yarn.model.rotary_emb.inv_freq)


def test_extension_configs_refuse_what_they_cannot_build():
    cfg = small_model().config
    with pytest.raises(ValueError, match="unknown extension 'rope'"):
        extended_config(cfg, "rope", 128)
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        ScaledRopeConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    yarn = extended_config(cfg, "yarn", 128)
    with pytest.raises(ValueError, match="default RoPE"):
        extended_config(yarn, "pi", 512)


def test_the_script_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    figure = tmp_path / "figure.png"
    results = main(["--size", "cpu", "--out", str(out), "--figure", str(figure), "--train-context", "64",
                    "--context", "256", "--bucket", "32", "--pretrain-steps", "2", "--finetune-steps", "1",
                    "--eval-windows", "2"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["evaluations"].keys() == results["evaluations"].keys()
    want = {"reference"} | {f"{m}/{s}" for m in METHODS for s in ("as_is", "fine_tuned")} | \
        {f"{m}/as_is" for m in ABLATIONS}
    assert set(saved["evaluations"]) == want
    assert len(saved["evaluations"]["reference"]["buckets_nats_per_char"]) == 64 // 32
    for name in want - {"reference"}:
        e = saved["evaluations"][name]
        assert len(e["buckets_nats_per_char"]) == 256 // 32
        assert all(math.isfinite(v) for v in e["buckets_nats_per_char"])
    # Below the trained context, 'no change' is the trained model on the same tokens.
    assert saved["evaluations"]["none/as_is"]["below_train_context"] == pytest.approx(
        saved["evaluations"]["reference"]["below_train_context"], rel=1e-5)
    assert saved["factor"] == 4.0 and saved["finetune"]["max_steps"] == 1 and saved["windows"] == 2
    assert saved["yarn_softmax_scale_multiplier"] == pytest.approx((0.1 * math.log(4) + 1) ** 2)
    assert figure.is_file() and (out / "finetune-yarn" / "metrics.jsonl").is_file()

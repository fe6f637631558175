"""Loading the layouts DeepSeek-V3 and Kimi K2 are published in: FP8 weights with one scale per
128 x 128 block (here 16 x 16, set in quantization_config, so that tiny matrices have several
blocks and partial ones at their edges), shards, and a multi-token-prediction layer that is
skipped. The expected model is built by dequantizing block by block in a plain loop."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from architectures.common.checkpoint import load_weights
from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config, from_pretrained, save_pretrained
from architectures.deepseek_v3.config import to_hf_config
from architectures.deepseek_v3.pretrained import dequantize_fp8, fused_to_hub, hub_to_fused

BLOCK = 16


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in) -> fp8 weight, scale_inv (ceil(out/16), ceil(in/16)), and the weight they stand for."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK), -(-cols // BLOCK)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nr, nc)
    meant = torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            scale[i, j] = blk.abs().max() / 448.0  # e4m3's largest finite value
            q_blk = (blk / scale[i, j]).to(torch.float8_e4m3fn)
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = q_blk
            meant[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = q_blk.float() * scale[i, j]
    return q, scale, meant


@pytest.fixture
def fp8_checkpoint(tmp_path):
    """A sharded FP8 checkpoint with an MTP layer, and the fp32 model it must load as."""
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=97, hidden_size=40, intermediate_size=72, moe_intermediate_size=24,
                           num_hidden_layers=2, num_attention_heads=2, q_lora_rank=20, kv_lora_rank=24,
                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_routed_experts=4,
                           num_experts_per_tok=2, initializer_range=0.2)
    model = DeepseekV3(cfg).eval()
    hub = fused_to_hub(model.state_dict())
    state, expected = {}, {}
    for name, t in hub.items():
        # As DeepSeek publishes: the linear layers' weights in FP8; embedding, head, norms, router stay.
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name and ".gate.weight" not in name:
            q, scale, meant = quantize(t)
            state[name], state[name + "_scale_inv"], expected[name] = q, scale, meant
        else:
            state[name] = expected[name] = t
    mtp = {"model.layers.2.eh_proj.weight": torch.randn(40, 80), "model.layers.2.enorm.weight": torch.ones(40)}
    names = sorted({**state, **mtp})
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    everything = {**state, **mtp}
    for file, keys in shards.items():
        save_file({k: everything[k].contiguous() for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    hf = dict(to_hf_config(cfg), num_nextn_predict_layers=1,
              quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [BLOCK, BLOCK]})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path, model, expected


def test_fp8_blocks_are_dequantized_and_mtp_layers_skipped(fp8_checkpoint, capsys):
    path, model, expected = fp8_checkpoint
    assert load_weights(path)["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    loaded = from_pretrained(path)
    assert "skipping the multi-token-prediction layer(s) model.layers.[2]" in capsys.readouterr().out
    reference = DeepseekV3(model.config).eval()
    reference.load_state_dict(hub_to_fused(expected, model.config, "expected"))
    for name, t in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0, msg=name)
    # Partial edge blocks: kv_b_proj is (2 * (8 + 12), 24) = (40, 24), 3 x 2 blocks of 16, the last ones partial.
    w = loaded.model.layers[0].self_attn.kv_b_proj.weight
    assert w.shape == (40, 24) and not torch.equal(w, model.model.layers[0].self_attn.kv_b_proj.weight)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(ids), rtol=0, atol=0)


def test_an_fp8_weight_without_its_scale_is_an_error_naming_it():
    state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is stored in torch\.float8_e4m3fn "
                                         r"but its scale model\.layers\.0\.mlp\.up_proj\.weight_scale_inv is missing"):
        dequantize_fp8(state, (128, 128), "ckpt")


def test_a_missing_expert_is_named(tmp_path, fp8_checkpoint):
    path, model, _ = fp8_checkpoint
    save_pretrained(model, tmp_path / "ours")
    state = load_file(str(tmp_path / "ours" / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"expert weights missing.*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        from_pretrained(tmp_path / "ours")

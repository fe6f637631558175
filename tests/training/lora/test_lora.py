"""LoRA and DoRA (training/lora/) against PEFT, the reference implementation, and the properties
training relies on.

The oracle is PEFT 0.21 on a tiny random transformers `LlamaForCausalLM`: an adapter PEFT saves
loads here to the same logits, and one we save loads in `PeftModel.from_pretrained` to the same
logits, within 1e-5 in fp32 (both compute the same ops; our Llama equals transformers' to ~1e-6
at this size, and a wrong scaling, transpose or norm axis shows at 1e-2 or more).
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from architectures import registry
from architectures.llama3 import Llama3, LlamaConfig, from_pretrained, preset
from inference.kv_cache import NaiveKVCache
from training.lora import (LoRAConfig, LoRALinear, apply_lora, disable_adapters, load_adapter, merge, save_adapter,
                           trainable_parameters, unmerge)
from training.optimizer import make_optimizer
from training.train_config import TrainConfig

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ATTN_MLP = ATTN + ["gate_proj", "up_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def hf_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)).eval()


def our_llama(tie: bool = False, seed: int = 0) -> Llama3:
    torch.manual_seed(seed)
    return Llama3(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              initializer_range=0.1, tie_word_embeddings=tie)).eval()


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    """B (zero at init) and DoRA's magnitude to random values, so every path of the update counts."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def adapter_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if "lora_" in n}


# ---- against PEFT --------------------------------------------------------------------------------

# (rank, alpha, targets, rsLoRA, DoRA): attention only or attention + MLP, a regex, both scalings, DoRA
CASES = [
    (4, 8, ATTN, False, False),
    (8, 16, ATTN_MLP, False, False),
    (2, 5, ATTN_MLP, True, False),
    (4, 8, ATTN, False, True),
    (8, 32, ATTN_MLP, True, True),
    (1, 3, r"model\.layers\.1\.(self_attn\.[qv]|mlp\.down)_proj", False, True),
]
case_ids = [f"r{r}-alpha{a}-{'regex' if isinstance(t, str) else len(t)}targets{'-rslora' if rs else ''}"
            f"{'-dora' if d else ''}" for r, a, t, rs, d in CASES]


def peft_model(base, r, alpha, targets, rslora, dora, dropout=0.0):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, use_dora=dora,
                          lora_dropout=dropout, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_adapter_saved_by_peft_loads_to_the_same_logits(tmp_path, case):
    ref = hf_llama()
    ref.save_pretrained(tmp_path / "base")
    pm = peft_model(ref, *case)
    pm.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        expected, got = pm(IDS).logits, ours(IDS)
        with disable_adapters(ours):
            base = ours(IDS)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - base).abs().max() > 1e-2  # the adapters do change the function


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5]], ids=[case_ids[i] for i in (1, 2, 4, 5)])
def test_adapter_we_save_loads_in_peft_to_the_same_logits_in_peft_format(tmp_path, case):
    r, alpha, targets, rslora, dora = case
    ref = hf_llama()
    ref.save_pretrained(tmp_path / "base")
    ours = apply_lora(from_pretrained(tmp_path / "base"), r=r, alpha=alpha, target_modules=targets,
                      use_rslora=rslora, use_dora=dora)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny-llama")
    with torch.no_grad():
        got = ours(IDS)
        expected = peft.PeftModel.from_pretrained(ref, tmp_path / "ours").eval()(IDS).logits
    torch.testing.assert_close(got, expected, **TOL)
    # The files are PEFT's: the same tensor names, and every config key we write has PEFT's value.
    peft_model(hf_llama(), *case).save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert mine["base_model_name_or_path"] == "tiny-llama"
    for key in set(mine) - {"base_model_name_or_path", "target_modules"}:
        assert mine[key] == theirs[key], key
    same = (lambda t: t) if isinstance(targets, str) else set
    assert same(mine["target_modules"]) == same(theirs["target_modules"])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_in_training_mode_matches_peft(tmp_path, dora):
    """With dropout on, DoRA applies W to the dropped input too; the same seed draws the same masks
    in both, since both call dropout once per adapted layer in the same order."""
    ref = hf_llama()
    ref.save_pretrained(tmp_path / "base")
    pm = peft_model(ref, 4, 8, ATTN_MLP, False, dora, dropout=0.3)
    pm.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert ours.model.layers[0].self_attn.q_proj.lora_dropout.p == 0.3
    pm.train()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(5)
        expected = pm(IDS).logits
        torch.manual_seed(5)
        got = ours(IDS)
        ours.eval()
        evaluated = ours(IDS)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - evaluated).abs().max() > 1e-3  # dropout did act


# ---- properties training relies on ---------------------------------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_leaves_the_model_unchanged(dora):
    base = our_llama()
    with torch.no_grad():
        expected = base(IDS)
    model = apply_lora(base, LoRAConfig(target_modules=ATTN_MLP), use_dora=dora)  # a config, and an override
    assert model.lora_config.use_dora == dora
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base_layer, torch.nn.Linear)
    assert torch.all(q.lora_B.weight == 0)  # delta W = B A = 0
    bound = 1 / math.sqrt(q.in_features)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert q.lora_A.weight.abs().max() <= bound and q.lora_A.weight.abs().max() > 0.5 * bound
    if dora:  # m = ||W||_c, the norm of each output row
        torch.testing.assert_close(q.lora_magnitude_vector, q.base_layer.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_equals_unmerged_and_unmerge_restores_the_base_weights(dora):
    model = apply_lora(our_llama(), target_modules=ATTN_MLP, use_dora=dora)
    randomize_adapters(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(IDS)
        merge(model)
        merged = model(IDS)
        changed = model.model.layers[0].mlp.down_proj.base_layer.weight
        assert not torch.allclose(changed, weights["model.layers.0.mlp.down_proj.base_layer.weight"])
        # the effective weight that code reading `proj.weight` sees is the same merged or not
        effective_merged = model.model.layers[0].mlp.down_proj.weight.clone()
        unmerge(model)
        again = model(IDS)
        effective = model.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(merged, unmerged, **TOL)  # the adapter is not added twice
    # W + BA - BA in fp32 is W to within an ulp or two per weight, ~1e-6 in the logits after the layers
    torch.testing.assert_close(again, unmerged, **TOL)
    torch.testing.assert_close(effective, effective_merged, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_disable_adapters_gives_the_base_logits_merged_or_not():
    base = our_llama()
    with torch.no_grad():
        expected = base(IDS)
    model = apply_lora(base, target_modules=ATTN_MLP, use_dora=True)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        with disable_adapters(model):
            torch.testing.assert_close(model(IDS), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(IDS), adapted)
        merge(model)
        with disable_adapters(model):
            torch.testing.assert_close(model(IDS), expected, **TOL)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(IDS), adapted, **TOL)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_frozen_base_gets_no_gradient_and_no_optimizer_state(dora):
    model = apply_lora(our_llama(tie=True), target_modules=ATTN_MLP, use_dora=dora).train()
    randomize_adapters(model)  # B != 0, so A receives a gradient too
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(adapters) == adapter_names(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert {id(p) for p in opt.state} == {id(p) for p in adapters.values()}
    for n, p in model.named_parameters():
        if n in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n


def test_trainable_parameters_counts_adapters_and_a_tied_head_once():
    model = our_llama(tie=True)
    total = model.num_parameters()  # the tied embedding/head counted once
    apply_lora(model, r=4, target_modules=ATTN_MLP + ["lm_head"])
    D, F, KV, V, L = 32, 64, 16, 97, 2  # KV: 2 key/value heads x head_dim 8
    per_layer = 4 * ((D + D) + (D + KV) + (D + KV) + (D + D) + 3 * (D + F))  # r (d_in + d_out) per projection
    adapters = L * per_layer + 4 * (D + V)  # + lm_head's
    assert trainable_parameters(model) == (adapters, total + adapters)


def test_llama_3_2_1b_with_rank_8_on_attention_trains_0_138_percent():
    """The figure in notes/lora.md: r (d_in + d_out) per adapted projection, built on the meta device."""
    with torch.device("meta"):
        model = apply_lora(Llama3(preset("llama-3.2-1b")), r=8)
    D, KV, L, r = 2048, 8 * 64, 16, 8
    adapters = L * r * ((D + D) + (D + KV) + (D + KV) + (D + D))
    trainable, total = trainable_parameters(model)
    assert (trainable, total - trainable) == (adapters, 1_235_814_400) and adapters == 1_703_936
    assert round(100 * trainable / (total - trainable), 3) == 0.138
    # Memory (fp32 AdamW): full fine-tuning keeps weight + gradient + 2 moments = 16 bytes a parameter;
    # LoRA keeps the base's 4 and the adapters' 16.
    full_gb, lora_gb = 16 * 1_235_814_400 / 1e9, (4 * 1_235_814_400 + 16 * adapters) / 1e9
    assert (round(full_gb, 1), round(lora_gb, 2)) == (19.8, 4.97)


# ---- every family of the zoo ---------------------------------------------------------------------

def family_models():
    from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config
    from architectures.gemma import Gemma, GemmaConfig
    from architectures.mamba2_hybrid import Mamba2Hybrid, Mamba2HybridConfig
    from architectures.mixtral import Mixtral, MixtralConfig

    small = dict(vocab_size=97, hidden_size=32, max_position_embeddings=64)
    return {
        "llama3": (lambda: our_llama(), ATTN_MLP),
        "mixtral": (lambda: Mixtral(MixtralConfig(intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                                  **small)), ATTN + ["gate"]),  # "gate": the router
        "deepseek_v3": (lambda: DeepseekV3(DeepseekV3Config(
            intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
            num_experts_per_tok=2, n_group=2, topk_group=1, **small)),
            ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "mamba2_hybrid": (lambda: Mamba2Hybrid(Mamba2HybridConfig(
            num_hidden_layers=4, hybrid_override_pattern="M*-E", mamba_num_heads=4, mamba_head_dim=16,
            ssm_state_size=8, n_groups=2, chunk_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=48, n_routed_experts=4, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
            **small)), ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "gemma": (lambda: Gemma(GemmaConfig(intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, sliding_window=4, sliding_window_pattern=3,
                                            final_logit_softcapping=5.0, **small)), ATTN_MLP),
    }


def test_every_registered_family_is_covered():
    assert set(family_models()) == set(registry.language_models())  # LoRA trains language models


@pytest.mark.parametrize("family", registry.language_models())
def test_lora_applies_to_every_family_and_a_step_trains_only_adapters(family):
    build, targets = family_models()[family]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        expected = model(IDS)
    apply_lora(model, r=4, target_modules=targets, use_dora=family == "deepseek_v3")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(targets)  # every target found; the 3-D expert tensors are not linear modules
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=1e-6, atol=1e-6)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0), torch.device("cpu"))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapter_names(model)
    assert any(".lora_B." in n for n in changed)
    with torch.no_grad():
        assert (model.eval()(IDS) - expected).abs().max() > 0


def test_mla_absorbed_decoding_sees_the_adapted_kv_b_proj():
    """MLA's cached decode step reads kv_b_proj.weight directly instead of calling the layer; with an
    adapter on it, that step's logits (absorbed, from the cache) equal the full forward's."""
    build, _ = family_models()["deepseek_v3"]
    torch.manual_seed(0)
    model = apply_lora(build().eval(), r=4, target_modules=["kv_b_proj", "q_b_proj"], use_dora=True)
    randomize_adapters(model, seed=3)
    ids = IDS[:1, :8]
    cache = NaiveKVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model.hidden_states(ids[:, :7], cache=cache)  # prefill (decompressed)
        decoded = model.compute_logits(model.hidden_states(ids[:, 7:], cache=cache))[0, -1]  # decode (absorbed)
        torch.testing.assert_close(decoded, model(ids)[0, -1], **TOL)


# ---- a quantized base (the QLoRA seam) -----------------------------------------------------------

class RoundedLinear(torch.nn.Module):
    """A stand-in for a quantized linear: integer codes and a per-row scale, dequantized on use."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 7
        self.register_buffer("codes", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def dequantize_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantize_weight(), self.bias)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_quantized_base_plugs_in_and_refuses_to_merge(dora):
    torch.manual_seed(0)
    quantized = RoundedLinear(torch.nn.Linear(32, 16, bias=True))
    reference = torch.nn.Linear(32, 16)
    with torch.no_grad():
        reference.weight.copy_(quantized.dequantize_weight())
        reference.bias.copy_(quantized.bias)
    holder_q, holder_r = torch.nn.Module(), torch.nn.Module()
    holder_q.proj, holder_r.proj = quantized, reference
    apply_lora(holder_q, target_modules=["proj"], use_dora=dora)
    apply_lora(holder_r, target_modules=["proj"], use_dora=dora)
    randomize_adapters(holder_q)
    adapters = dict(holder_q.named_parameters())
    with torch.no_grad():
        for name, p in holder_r.named_parameters():
            if "lora_" in name:
                p.copy_(adapters[name])
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(holder_q.proj(x), holder_r.proj(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="full-precision base"):
        merge(holder_q)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.fixture
def saved_adapter(tmp_path):
    model = apply_lora(our_llama(), r=4)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_adapter_config(directory, **fields):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_target_that_matches_no_module_lists_the_linear_modules():
    with pytest.raises(ValueError, match=r"matches no linear module.*q_proj.*up_proj"):
        apply_lora(our_llama(), target_modules=["query_key_value"])
    with pytest.raises(ValueError, match="matches no linear module"):
        apply_lora(our_llama(), target_modules=r"layers\.0\.q_proj")  # a regex must match the whole name


def test_rank_below_one_is_refused(saved_adapter):
    with pytest.raises(ValueError, match="r must be an integer >= 1, got r=0"):
        apply_lora(our_llama(), r=0)
    edit_adapter_config(saved_adapter, r=0)
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        load_adapter(our_llama(), saved_adapter)


def test_adapter_tensor_of_the_wrong_shape_names_it_and_both_shapes(saved_adapter):
    file = saved_adapter / "adapter_model.safetensors"
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors = load_file(file)
    tensors[name] = torch.zeros(24, 4)
    save_file(tensors, file)
    model = our_llama()
    with pytest.raises(ValueError, match=rf"{name}: file \(24, 4\) vs model \(16, 4\)"):
        load_adapter(model, saved_adapter)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # checked before touching the model


def test_adapter_of_another_peft_type_is_refused(saved_adapter):
    edit_adapter_config(saved_adapter, peft_type="IA3")
    with pytest.raises(ValueError, match="type 'IA3'; only LORA adapters"):
        load_adapter(our_llama(), saved_adapter)


def test_unsupported_lora_option_is_refused(saved_adapter):
    edit_adapter_config(saved_adapter, bias="all")
    with pytest.raises(ValueError, match="bias='all'.*bias='none' are supported"):
        load_adapter(our_llama(), saved_adapter)


def test_missing_adapter_file_is_named(saved_adapter):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors") as e:
        load_adapter(our_llama(), saved_adapter)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(our_llama(), saved_adapter.parent / "nowhere")


def test_merging_a_tied_head_is_refused():
    model = apply_lora(our_llama(tie=True), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="tied to.*embed_tokens"):
        merge(model)

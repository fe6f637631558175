"""training/posttrain.py: the reference, and a mixture-of-experts base's auxiliary losses and hook in
every post-training method.

A tiny Mixtral and a tiny DeepSeek-V3 (the `tiny` presets shrunk), saved with the tokenizer of the
shared `chat_base`, are fine-tuned a couple of steps by SFT and DPO: their metrics carry the
family's terms, the loss includes them, they come from the policy's pass and not from a LoRA
reference run afterwards on the same modules, and DeepSeek-V3's router bias moves after each step.
"""

import dataclasses
import functools
import json

import pytest
import torch

from architectures import registry
from architectures.llama3 import from_pretrained as llama_from_pretrained
from architectures.mixtral.losses import router_aux_terms
from training.chat import ZooChat
from training.dpo.data import Pair, collate, encode_pairs
from training.dpo.train import dpo_step
from training.lora.lora import disable_adapters, lora_layers
from training.posttrain import Reference, family_on_step, policy_and_reference, with_aux_loss
from training.sft.batch import SFTBatches, encode_all
from training.sft.loss import sft_loss
from training.tasks import arithmetic
from training.tokenizer import Tokenizer

SFT = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "4", "--block-size", "64", "--eval-interval", "2",
       "--eval-batches", "1", "--log-interval", "1", "--arithmetic-examples", "40", "--speaker-examples", "0",
       "--eval-examples", "2", "--val-conversations", "8"]
DPO = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1",
       "--train-pairs", "8", "--test-pairs", "4", "--log-interval", "1"]


def moe_base(tmp_path_factory, chat_base, family: str, **fields):
    """The family's `tiny` preset shrunk, with chat_base's tokenizer, saved as a checkpoint directory."""
    tokenizer = Tokenizer.from_file(chat_base)
    package = registry.package(family)
    cfg = dataclasses.replace(package.preset("tiny"), vocab_size=tokenizer.vocab_size, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128, **fields)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(family)
    package.save_pretrained(registry.model_class(family)(cfg), out)
    tokenizer.save(out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def mixtral_base(tmp_path_factory, chat_base):
    return moe_base(tmp_path_factory, chat_base, "mixtral", intermediate_size=32, num_key_value_heads=1,
                    num_local_experts=4)


@pytest.fixture(scope="module")
def deepseek_base(tmp_path_factory, chat_base):
    # One dense layer, then one MoE layer of 4 routed experts; the sequence-wise balance loss on.
    return moe_base(tmp_path_factory, chat_base, "deepseek_v3", intermediate_size=64, moe_intermediate_size=16,
                    num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    n_routed_experts=4,
                    n_group=2, topk_group=1, seq_aux_loss_alpha=0.01)


def logged(out) -> list[dict]:
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def chat_batch(base):
    fmt = ZooChat(Tokenizer.from_file(base))
    encoded = encode_all([e.conversation() for e in arithmetic("train", 12)], fmt, 64)
    return SFTBatches(encoded, encoded, 64, fmt.tokenizer.pad_id)("train", 4, torch.Generator().manual_seed(0))


def preference_batch(base):
    fmt = ZooChat(Tokenizer.from_file(base))
    pairs = [Pair(({"role": "user", "content": f"What is {i} + 1?"},), str(i + 1), str(i + 7)) for i in range(3)]
    return collate(encode_pairs(pairs, fmt, 64), 64, fmt.tokenizer.pad_id)


# ---------------------------------------------------------------------------- the loss and its terms


def test_a_dense_family_keeps_its_loss_and_has_no_hook(chat_base):
    model = llama_from_pretrained(chat_base)
    assert with_aux_loss(sft_loss, model) is sft_loss
    assert family_on_step(model) is None

    def hook(step, model):
        pass
    assert family_on_step(model, hook) is hook


def test_sft_loss_on_mixtral_adds_the_balance_and_z_losses_once_per_token(mixtral_base):
    model = registry.from_pretrained(mixtral_base).train()
    batch = chat_batch(mixtral_base)
    loss, metrics = with_aux_loss(sft_loss, model)(model, batch)
    plain, counted = sft_loss(model, batch)
    cfg = model.config
    assert {"aux_loss", "z_loss", "moe/l0/load_e0", "num_tokens"} <= set(metrics)
    aux = cfg.router_aux_loss_coef * metrics["aux_loss"] + cfg.router_z_loss_coef * metrics["z_loss"]
    # sft_loss is a sum over its tokens, which the loop divides by the step's: the terms come once per token.
    torch.testing.assert_close(loss, plain + aux * counted["num_tokens"])
    with torch.no_grad():  # the loop's evaluation: the method's own loss, nothing added
        evaluated, metrics = with_aux_loss(sft_loss, model)(model, batch)
    torch.testing.assert_close(evaluated, plain.detach())
    assert "aux_loss" not in metrics


def test_the_chunked_loss_keeps_its_chunk_size_through_the_wrapper(mixtral_base):
    import inspect

    model = registry.from_pretrained(mixtral_base).train()
    wrapped = with_aux_loss(sft_loss, model)
    assert "chunk_size" in inspect.signature(wrapped).parameters  # the loop asks before it passes --loss-chunk
    batch = chat_batch(mixtral_base)
    torch.testing.assert_close(wrapped(model, batch, chunk_size=16)[0], wrapped(model, batch)[0])


def test_dpo_with_lora_takes_the_terms_from_the_policys_pass_not_the_references(mixtral_base):
    """The LoRA reference is the policy with its adapters off, run after the policy on the same
    modules: the terms must be the policy's (adapters on, with gradients), not the reference's."""
    model = registry.from_pretrained(mixtral_base).train()
    reference = policy_and_reference(model, lora=True, r=4)
    assert reference.frozen is None
    torch.manual_seed(1)
    for layer in lora_layers(model).values():  # adapters that move the routing
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    batch = preference_batch(mixtral_base)
    step = functools.partial(dpo_step, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    loss, metrics = with_aux_loss(step, model)(model, batch)
    plain, _ = step(model, batch)
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    _, policy_logits = model(ids, output_router_logits=True)
    terms, want = router_aux_terms(model.config, policy_logits)
    with torch.no_grad(), disable_adapters(model):
        _, reference_logits = model(ids, output_router_logits=True)
    assert float(router_aux_terms(model.config, reference_logits)[1]["aux_loss"]) != pytest.approx(
        float(want["aux_loss"]))  # the two passes route differently, so the test can tell them apart
    torch.testing.assert_close(metrics["aux_loss"], want["aux_loss"])
    torch.testing.assert_close(loss, plain + terms)
    assert loss.requires_grad


# ---------------------------------------------------------------------------- the methods end to end


def test_sft_of_a_mixtral_base_logs_and_trains_its_auxiliary_losses(mixtral_base, tmp_path, monkeypatch):
    from training.sft.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    main(["--base", str(mixtral_base), "--out", str(tmp_path / "sft")] + SFT)
    entries = logged(tmp_path / "sft")
    assert len(entries) == 2 and all({"aux_loss", "z_loss", "moe/l1/load_entropy"} <= set(e) for e in entries)


def test_dpo_with_lora_of_a_mixtral_base_logs_its_auxiliary_losses(mixtral_base, tmp_path, monkeypatch):
    from training.dpo.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    main(["--base", str(mixtral_base), "--out", str(tmp_path / "dpo"), "--lora", "true", "--lora-r", "4"] + DPO)
    entries = logged(tmp_path / "dpo")
    assert entries and all({"aux_loss", "z_loss", "rewards/margins"} <= set(e) for e in entries)


def test_sft_of_a_deepseek_base_moves_the_router_bias_every_step(deepseek_base, tmp_path, monkeypatch):
    from training.sft.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    before = registry.from_pretrained(deepseek_base).model.layers[1].mlp.gate.e_score_correction_bias
    assert not before.any()
    main(["--base", str(deepseek_base), "--out", str(tmp_path / "sft")] + SFT)
    after = registry.from_pretrained(tmp_path / "sft").model.layers[1].mlp.gate.e_score_correction_bias
    # Two updates of +-gamma (0 for an expert exactly at the mean load): the loads were not all equal.
    assert after.any()
    entries = logged(tmp_path / "sft")
    assert all({"seq_balance_loss", "moe/l1/max_load"} <= set(e) for e in entries)


# ---------------------------------------------------------------------------- the reference


def test_the_reference_is_the_frozen_copy_or_the_policy_with_adapters_off(chat_base):
    model = llama_from_pretrained(chat_base)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    base = model(ids).detach()
    copied = policy_and_reference(model, lora=False, r=4)
    assert copied.frozen["reference"] is copied.copy and not copied.copy.training
    assert Reference.from_frozen(copied.frozen).copy is copied.copy
    torch.testing.assert_close(copied.logits(model, ids), base)
    shared = policy_and_reference(model, lora=True, r=4)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight)
    assert Reference.from_frozen(None).copy is None and shared.frozen is None
    assert not torch.allclose(model(ids), base)  # the policy's adapters now change its logits ...
    torch.testing.assert_close(shared.logits(model, ids), base)  # ... and the reference switches them off
    assert not shared.logits(model, ids).requires_grad

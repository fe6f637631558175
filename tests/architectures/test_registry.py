"""Every family in architectures/registry.py keeps the whole contract it declares: its config module
has presets, its model class builds from them and returns logits of the promised shape, its loss
and auxiliary loss return what the loop and the methods expect, its hook runs, its FLOPs formula
is positive, and save_pretrained / from_pretrained round-trip the weights exactly."""

import dataclasses

import pytest
import torch

from architectures import registry

FAMILIES = sorted(registry.FAMILIES)


def tiny_model(name: str):
    contract = registry.family(name)
    cfg = dataclasses.replace(contract.config.preset("tiny"), vocab_size=61)
    torch.manual_seed(0)
    return contract.model_class(cfg)


@pytest.mark.parametrize("name", FAMILIES)
def test_config_module_has_presets_and_the_model_class_builds_from_them(name):
    contract = registry.family(name)
    assert "tiny" in contract.config.PRESETS
    model = tiny_model(name)
    assert registry.family_of(model) == name
    logits = model(torch.randint(0, 61, (2, 9)))
    assert logits.shape == (2, 9, 61)


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_aux_loss_and_on_step_have_the_shapes_the_loop_and_methods_rely_on(name):
    contract = registry.family(name)
    model = tiny_model(name).train()
    x = torch.randint(0, 61, (2, 9))
    loss, metrics = contract.loss(model, (x, x.roll(-1, dims=1)))
    assert loss.dim() == 0 and torch.isfinite(loss) and isinstance(metrics, dict)
    loss.backward()
    if contract.aux_loss is not None:
        model(x)  # any forward pass of the policy: the auxiliary terms are read from it
        aux, aux_metrics = contract.aux_loss(model)
        assert isinstance(aux_metrics, dict)
        assert aux is None or (aux.dim() == 0 and aux.requires_grad)
        model.eval()
        model(x)
        assert contract.aux_loss(model)[0] is None  # no auxiliary terms outside training
    if contract.on_step is not None:
        contract.on_step(1, model)
    assert contract.flops_per_token(model.config, 9) > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_and_from_pretrained_round_trip_through_the_registry(name, tmp_path):
    contract = registry.family(name)
    model = tiny_model(name).eval()
    contract.save_pretrained(model, tmp_path)
    loaded = registry.from_pretrained(tmp_path)
    assert type(loaded) is contract.model_class
    x = torch.randint(0, 61, (1, 7))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_mixtral_aux_loss_is_the_pretraining_loss_minus_the_cross_entropy():
    model = tiny_model("mixtral").train()
    x = torch.randint(0, 61, (2, 9))
    loss, metrics = registry.family("mixtral").loss(model, (x, x.roll(-1, dims=1)))
    aux, _ = registry.family("mixtral").aux_loss(model)  # the router logits of that same forward
    torch.testing.assert_close(loss - metrics["lm_loss"], aux, rtol=0, atol=2e-6)  # fp32 rounding of a sum near 4

"""Every family in architectures/registry.py keeps the whole contract its kind declares. A causal LM:
its config module has presets, its model class builds from them and returns logits of the promised
shape, its loss and auxiliary loss return what the loop and the methods expect, its hook runs, its
FLOPs formula is positive, and save_pretrained / from_pretrained round-trip the weights exactly.
A diffusion family: its model class builds from a preset (`from_config`) and predicts noise of the
latent's shape, its loss is a finite scalar that trains the U-Net and the text encoder, and a saved
pipeline comes back through the registry as the same function; every family is of a known kind."""

import dataclasses

import pytest
import torch

from architectures import registry

FAMILIES = sorted(registry.language_models())
DIFFUSION = sorted(n for n, f in registry.FAMILIES.items() if f.kind == "diffusion")


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


def test_every_family_is_of_a_known_kind_and_the_lm_families_are_the_rest():
    assert {f.kind for f in registry.FAMILIES.values()} <= {"causal_lm", "diffusion"}
    assert set(FAMILIES) | set(DIFFUSION) == set(registry.FAMILIES) and DIFFUSION


def tiny_pipeline(name: str):
    contract = registry.family(name)
    cfg = dataclasses.replace(contract.config.preset("tiny"), image_size=16, vae_channels=8, vae_levels=2,
                              unet_channels=8, norm_groups=4, text_hidden=8, text_layers=1, vocab_size=514)
    torch.manual_seed(0)
    return contract.model_class.from_config(cfg)


def diffusion_batch(pipe, n: int = 2) -> dict:
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    return {"labels": torch.arange(n), "input_ids": pipe.tokenizer(["a cat", ""][:n] * (n // 2)),
            "latents": torch.randn(n, channels, size, size, generator=g),
            "noise": torch.randn(n, channels, size, size, generator=g), "timesteps": torch.tensor([5, 900])[:n]}


@pytest.mark.parametrize("name", DIFFUSION)
def test_a_diffusion_family_builds_predicts_noise_and_trains_through_its_loss(name):
    contract = registry.family(name)
    assert "tiny" in contract.config.PRESETS and contract.flops_per_token is None
    pipe = tiny_pipeline(name).train()
    assert registry.family_of(pipe) == name
    batch = diffusion_batch(pipe)
    text = pipe.text_encoder(batch["input_ids"])
    assert pipe.unet(batch["latents"], batch["timesteps"], text).shape == batch["latents"].shape
    loss, metrics = contract.loss(pipe, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and isinstance(metrics, dict)
    loss.backward()
    for part in ("unet", "text_encoder"):
        assert all(p.grad is not None for p in getattr(pipe, part).parameters()), part


@pytest.mark.parametrize("name", DIFFUSION)
def test_a_diffusion_pipeline_round_trips_through_the_registry(name, tmp_path):
    contract = registry.family(name)
    pipe = tiny_pipeline(name).eval()
    contract.save_pretrained(pipe, tmp_path)
    loaded = registry.from_pretrained(tmp_path, kind=None)
    assert type(loaded) is contract.model_class
    batch = diffusion_batch(pipe)
    with torch.no_grad():
        torch.testing.assert_close(contract.loss(loaded, batch)[0], contract.loss(pipe, batch)[0], rtol=0, atol=0)
        image = torch.rand(1, 1, 16, 16)
        torch.testing.assert_close(loaded.vae.encode(image), pipe.vae.encode(image), rtol=0, atol=0)


def test_mixtral_aux_loss_is_the_pretraining_loss_minus_the_cross_entropy():
    model = tiny_model("mixtral").train()
    x = torch.randint(0, 61, (2, 9))
    loss, metrics = registry.family("mixtral").loss(model, (x, x.roll(-1, dims=1)))
    aux, _ = registry.family("mixtral").aux_loss(model)  # the router logits of that same forward
    torch.testing.assert_close(loss - metrics["lm_loss"], aux, rtol=0, atol=2e-6)  # fp32 rounding of a sum near 4

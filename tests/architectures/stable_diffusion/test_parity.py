"""Stable Diffusion's models are the same functions as diffusers' and transformers': the U-Net's predicted
noise, the VAE's latent mean, log-variance and decoded images, and the CLIP text encoder's last hidden
states agree within 1e-4 in fp32, for tiny random models saved by the reference and loaded here; a
whole 10-step DDIM sampling loop with guidance equals StableDiffusionPipeline's output from the same
noise; and a pipeline saved here loads in diffusers as the same function."""

from __future__ import annotations

import shutil

import pytest
import torch

import diffusers
import transformers

from architectures.stable_diffusion import from_pretrained, generate, save_pretrained
from architectures.stable_diffusion.config import unet_from_dict, vae_from_dict
from architectures.stable_diffusion.tokenizer import from_pretrained as tokenizer_from_pretrained, train_tokenizer
from architectures.stable_diffusion.pretrained import DIFFUSERS_WEIGHTS, load_component, read_json
from architectures.stable_diffusion.unet import UNet2DConditionModel
from architectures.stable_diffusion.vae import AutoencoderKL
from tests.architectures.stable_diffusion.reference import TEXT, reference_pipeline, reference_unet, reference_vae

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    return reference_pipeline(path), from_pretrained(path), path


def load_like(reference, cls, reader, tmp_path):
    reference.save_pretrained(tmp_path)
    cfg = reader(read_json(tmp_path / "config.json"), str(tmp_path))
    return load_component(cls, cfg, tmp_path, DIFFUSERS_WEIGHTS, torch.float32, "cpu")


UNET_VARIANTS = {
    "sd1": {},
    "two layers, heads per level, linear projections": dict(layers_per_block=2, attention_head_dim=(2, 4),
                                                            use_linear_projection=True),
    "three levels, two transformer layers": dict(block_out_channels=(16, 32, 32), transformer_layers_per_block=2,
                                                 down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2),
}


@pytest.mark.parametrize("variant", UNET_VARIANTS)
def test_unet_predicts_the_noise_diffusers_predicts(variant, tmp_path):
    ref = reference_unet(**UNET_VARIANTS[variant])
    ours = load_like(ref, UNet2DConditionModel, unet_from_dict, tmp_path)
    torch.manual_seed(1)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    for t in (torch.tensor([3, 981]), torch.tensor(500), 17):
        with torch.no_grad():
            torch.testing.assert_close(ours(latents, t, text), ref(latents, t, encoder_hidden_states=text).sample, **TOL)


def test_unet_of_a_size_its_levels_do_not_divide_matches_too(tmp_path):
    ref = reference_unet()
    ours = load_like(ref, UNet2DConditionModel, unet_from_dict, tmp_path)
    latents, text = torch.randn(1, 4, 10, 6), torch.randn(1, 5, 24)  # 10 -> 5 -> up to 10: fine; 6 -> 3 -> 6
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, 9, text), ref(latents, 9, encoder_hidden_states=text).sample, **TOL)


@pytest.mark.parametrize("changes", [{}, dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                                              down_block_types=("DownEncoderBlock2D",) * 3,
                                              up_block_types=("UpDecoderBlock2D",) * 3)], ids=["two levels", "three levels"])
def test_vae_encodes_and_decodes_as_diffusers(changes, tmp_path):
    ref = reference_vae(**changes)
    ours = load_like(ref, AutoencoderKL, vae_from_dict, tmp_path)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        mean, logvar = ours.encode(images)
        torch.testing.assert_close(mean, posterior.mean, **TOL)
        torch.testing.assert_close(logvar, posterior.logvar, **TOL)
        torch.testing.assert_close(ours.decode(mean), ref.decode(posterior.mean).sample, **TOL)


def test_text_encoder_last_hidden_states_equal_transformers(pipelines):
    ref, ours, _ = pipelines
    ids = torch.randint(0, TEXT["vocab_size"], (3, TEXT["max_position_embeddings"]))
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids), ref.text_encoder(ids).last_hidden_state, **TOL)


PROMPTS = ("a cat", "Hello,  WORLD!", "l'été 42", "", "the digit seven, drawn twice")


def test_tokenizer_gives_transformers_ids(pipelines):
    ref, ours, _ = pipelines
    for prompt in ("a cat", "Hi,  YOU!", "l'été 4", ""):
        want = ref.tokenizer(prompt, padding="max_length", max_length=12).input_ids
        assert ours.tokenizer([prompt], 12)[0].tolist() == want


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json + merges.txt"])
def test_a_trained_tokenizer_gives_transformers_ids_from_either_layout(layout, tmp_path):
    ours = train_tokenizer(["the digit seven drawn twice", "a cat and a dog", "hello world"] * 5, 600, 32)
    ours.save_pretrained(tmp_path)
    if layout != "tokenizer.json":
        (tmp_path / "tokenizer.json").unlink()
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    loaded = tokenizer_from_pretrained(tmp_path)
    assert len(ours.merges) > 10  # merges were learned, so BPE itself is compared, not only bytes
    for prompt in PROMPTS:
        want = theirs(prompt, padding="max_length", max_length=32).input_ids
        assert loaded([prompt], 32)[0].tolist() == want == ours([prompt], 32)[0].tolist()


@pytest.mark.slow
def test_ten_step_ddim_loop_with_guidance_equals_stable_diffusion_pipeline(pipelines):
    ref, ours, _ = pipelines
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "two cats"]
    kw = dict(num_inference_steps=10, guidance_scale=4.0, latents=noise.clone())
    want_latents = ref(prompts, output_type="latent", **kw).images
    want_images = ref(prompts, output_type="np", **kw).images  # (B, H, W, C) in [0, 1]
    got_latents = generate(ours, prompts, steps=10, guidance=4.0, sampler="ddim", latents=noise, output="latents")
    got_images = generate(ours, prompts, steps=10, guidance=4.0, sampler="ddim", latents=noise)
    torch.testing.assert_close(got_latents, want_latents, **TOL)
    torch.testing.assert_close(got_images.permute(0, 2, 3, 1), torch.from_numpy(want_images), **TOL)


@pytest.mark.slow
def test_a_pipeline_saved_here_loads_in_diffusers_as_the_same_function(pipelines, tmp_path):
    _, ours, _ = pipelines
    save_pretrained(ours, tmp_path)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    want = theirs("a dog", num_inference_steps=4, guidance_scale=2.0, latents=noise.clone(), output_type="latent").images
    got = generate(ours, ["a dog"], steps=4, guidance=2.0, latents=noise, output="latents")
    torch.testing.assert_close(got, want, **TOL)
    again = from_pretrained(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_a_pipeline_missing_a_component_is_refused_naming_it(pipelines, component, tmp_path):
    _, _, path = pipelines
    shutil.copytree(path, tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / component)
    with pytest.raises(FileNotFoundError, match=f"missing its {component}/ folder"):
        from_pretrained(tmp_path / "p")


def test_a_missing_weight_file_and_a_directory_without_model_index_are_refused(pipelines, tmp_path):
    _, _, path = pipelines
    shutil.copytree(path, tmp_path / "p")
    (tmp_path / "p" / "unet" / DIFFUSERS_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {DIFFUSERS_WEIGHTS}"):
        from_pretrained(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        from_pretrained(tmp_path / "p" / "vae")


def test_an_unsupported_unet_setting_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        unet_from_dict({"class_embed_type": "timestep"}, "unet/config.json")


def test_guidance_zero_is_the_unconditional_model_and_one_the_conditional(pipelines):
    _, ours, _ = pipelines
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    run = lambda prompts, g: generate(ours, prompts, steps=3, guidance=g, latents=noise, output="latents")  # noqa: E731
    torch.testing.assert_close(run(["a cat", "a dog"], 0.0), run(["", ""], 1.0), rtol=1e-5, atol=1e-5)
    conditional = run(["a cat", "a dog"], 1.0)
    assert not torch.allclose(conditional, run(["", ""], 1.0), atol=1e-3)  # the prompt does change the result
    halfway = run(["a cat", "a dog"], 0.5)
    assert not torch.allclose(halfway, conditional, atol=1e-4) and not torch.allclose(halfway, run(["", ""], 1.0), atol=1e-4)

"""The tools that only make sense for a language model refuse a diffusion family or a diffusion pipeline
in one line (exit status 2, `error: ...`, no traceback), saying what the pipeline is and how to use it:
inference.generate, inference.memory, the LM training command line, a post-training method's --base,
distillation's --student-family, and the registry's from_pretrained dispatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from architectures import registry
from architectures.stable_diffusion import StableDiffusion, preset, save_pretrained
from tests.architectures.stable_diffusion.errors import one_line_error


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    cfg = dataclasses.replace(preset("tiny"), image_size=16, vae_channels=8, vae_levels=2, unet_channels=8,
                              norm_groups=4, text_hidden=8, text_layers=1, vocab_size=514)
    torch.manual_seed(0)
    save_pretrained(StableDiffusion.from_config(cfg), path)
    return path


def test_the_registry_refuses_a_pipeline_where_a_language_model_is_expected_and_loads_it_otherwise(pipeline_dir):
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline \\(diffusion\\), not a causal language model"):
        registry.from_pretrained(pipeline_dir)
    assert isinstance(registry.from_pretrained(pipeline_dir, kind=None), StableDiffusion)
    assert isinstance(registry.from_pretrained(pipeline_dir, kind="diffusion"), StableDiffusion)


def test_generate_refuses_a_pipeline(pipeline_dir, capsys):
    from inference.generate import main

    one_line_error(capsys, main, ["--checkpoint", str(pipeline_dir), "--prompt", "hi"],
                   "is a diffusers pipeline", "not a causal language model")


def test_memory_refuses_a_diffusion_family(capsys):
    from inference.memory import main

    one_line_error(capsys, main, ["--family", "stable_diffusion"], "inference.memory", "stable_diffusion is a diffusion family")


def test_the_lm_training_command_line_refuses_a_diffusion_family():
    from training.cli import run

    with pytest.raises(ValueError, match="language-model training command line .* stable_diffusion is a diffusion family"):
        run("stable_diffusion", argv=[])


def test_a_post_training_base_that_is_a_pipeline_is_refused(pipeline_dir, capsys, tmp_path):
    from training.sft.train import main

    one_line_error(capsys, main, ["--base", str(pipeline_dir), "--out", str(tmp_path / "o"), "--max-steps", "1"],
                   "not a causal language model")


def test_distillation_refuses_a_diffusion_student(capsys, tmp_path):
    from training.distillation.train import main

    one_line_error(capsys, main, ["--student-family", "stable_diffusion", "--out", str(tmp_path / "o")],
                   "--student-family", "diffusion family")

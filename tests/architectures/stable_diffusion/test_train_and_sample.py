"""The train script runs both stages on the one loop and writes a pipeline the sample script and
from_pretrained read; --resume continues it exactly; the sample script and the experiment's classifier
work; and bad input ends in one line: a pipeline missing a component, a prompt longer than the
context, steps <= 0, a guidance scale that is not a number."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from architectures.stable_diffusion import from_pretrained, generate
from architectures.stable_diffusion.digits import NAMES, caption, load_digits
from architectures.stable_diffusion.train import main as train_main
from architectures.stable_diffusion.sample import main as sample_main
from architectures.utils.files import read_jsonl
from tests.architectures.stable_diffusion.errors import one_line_error

# A run of a few seconds: a smaller VAE and U-Net than the preset's, a few steps of each stage.
TINY = ["--vae-steps", "4", "--vae-batch-size", "8", "--max-steps", "6", "--batch-size", "8", "--eval-interval", "3",
        "--eval-batches", "1", "--log-interval", "3", "--vae-channels", "8", "--unet-channels", "8", "--norm-groups", "4",
        "--text-hidden", "8", "--sample-steps", "2", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd") / "run"
    summary = train_main([*TINY, "--out", str(out)])
    return out, summary


@pytest.mark.slow
def test_the_train_script_writes_a_pipeline_that_loads_and_samples(trained):
    out, summary = trained
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "samples.png",
                 "autoencoder/diffusion_pytorch_model.safetensors"):
        assert (out / part).exists(), part
    assert summary["steps"] == 6 and summary["images_per_s"] > 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [e["step"] for e in metrics if "tokens_per_s" in e] == [3, 6]
    pipe = from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    images = generate(pipe, [caption(7), caption(1)], 3, 2.0, "euler", generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """Three steps, then --resume to six, logs the losses six steps in one go log (a constant learning
    rate, so that the schedule, which depends on --max-steps, is the same in both)."""
    flat = [*TINY, "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-steps", "0", "--log-interval", "1"]
    train_main([*flat, "--out", str(tmp_path / "whole")])
    train_main([*flat, "--out", str(tmp_path / "half"), "--max-steps", "3"])
    train_main([*flat, "--out", str(tmp_path / "half"), "--resume"])
    whole = [e["loss"] for e in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "loss" in e]
    resumed = [e["loss"] for e in read_jsonl(tmp_path / "half" / "metrics.jsonl") if "loss" in e]
    assert len(whole) == 6 and resumed == pytest.approx(whole, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_the_sample_script_writes_a_grid(trained, tmp_path):
    out, _ = trained
    png = tmp_path / "grid.png"
    sample_main(["--checkpoint", str(out), "--prompt", "the digit seven", "--prompt", "two", "--steps", "3",
                 "--num", "3", "--sampler", "ddpm", "--out", str(png)])
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("argv, names", [
    (["--steps", "0"], ["--steps must be a whole number from 1", "got 0"]),
    (["--steps", "-5"], ["--steps must be a whole number from 1"]),
    (["--guidance", "strong"], ["--guidance expects a number", "'strong'"]),
    (["--guidance", "nan"], ["--guidance must be a finite number"]),
    (["--prompt", "the digit seven drawn in a very careful and long way"], ["longer than the text encoder's context"]),
    (["--sampler", "plms"], ["--sampler 'plms' is not one of ddpm, ddim, euler"]),
    (["--sampler", "euler", "--eta", "0.5"], ["--eta is DDIM's noise"]),
])
def test_bad_sample_input_is_one_line(trained, capsys, tmp_path, argv, names):
    out, _ = trained
    base = {"--prompt": "seven", "--steps": "2", "--out": str(tmp_path / "x.png")}
    given = dict(zip(argv[::2], argv[1::2]))
    args = ["--checkpoint", str(out)] + [x for k, v in {**base, **given}.items() for x in (k, v)]
    one_line_error(capsys, sample_main, args, *names)


@pytest.mark.slow
def test_a_pipeline_missing_a_component_is_one_line(trained, capsys, tmp_path):
    out, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("train_state", "autoencoder"))
    shutil.rmtree(broken / "text_encoder")
    one_line_error(capsys, sample_main, ["--checkpoint", str(broken), "--prompt", "seven"], "missing its text_encoder/")


def test_bad_training_settings_are_one_line(capsys, tmp_path):
    one_line_error(capsys, train_main, ["--caption-dropout", "1.5", "--out", str(tmp_path / "a")], "--caption-dropout")
    one_line_error(capsys, train_main, ["--sample-guidance", "x", "--out", str(tmp_path / "b")], "--sample-guidance")
    one_line_error(capsys, train_main, ["--image-size", "20", "--out", str(tmp_path / "c")], "--image-size 20")


def test_the_digits_and_their_captions():
    digits = load_digits(16)
    assert digits.train_images.shape[1:] == (1, 16, 16) and len(digits.val_labels) == 179
    assert -1 <= float(digits.train_images.min()) < float(digits.train_images.max()) <= 1
    assert set(digits.val_labels.tolist()) == set(range(10))
    assert caption(7) == "the digit seven" and len(NAMES) == 10


@pytest.mark.slow
def test_the_classifier_recognises_held_out_digits(tmp_path):
    from architectures.stable_diffusion.experiments.classifier import accuracy, trained_classifier

    digits = load_digits(16)
    judge = trained_classifier(digits, tmp_path / "c.safetensors", steps=150)
    assert accuracy(judge, digits.val_images, digits.val_labels) > 0.9
    again = trained_classifier(digits, tmp_path / "c.safetensors")  # loaded, not retrained
    assert accuracy(again, digits.val_images, digits.val_labels) == accuracy(judge, digits.val_images, digits.val_labels)
    assert json.dumps(accuracy(judge, digits.val_images[:0], digits.val_labels[:0])) == "NaN"  # nothing to judge

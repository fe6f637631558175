"""The noise schedule and the DDPM, DDIM and Euler samplers equal diffusers' schedulers: the forward
process and the v target, the timesteps each spacing picks, and every step of a sampling run (each
step fed the same latent and model output) to 1e-6, for epsilon and v-prediction; and bad settings
are refused."""

from __future__ import annotations

import pytest
import torch

import diffusers

from architectures.stable_diffusion.config import SchedulerConfig
from architectures.stable_diffusion.scheduler import NoiseSchedule, make_sampler
from tests.architectures.stable_diffusion.reference import SCHEDULER

TOL = dict(rtol=1e-6, atol=1e-6)
REFERENCE = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}


def schedulers(name: str, **changes):
    settings = {**SCHEDULER, **changes}
    theirs_settings = dict(settings)
    if name != "ddim":  # the others have no DDIM-only settings
        theirs_settings.pop("set_alpha_to_one")
    if name == "euler":
        theirs_settings.pop("clip_sample")
    return NoiseSchedule(SchedulerConfig(**settings)), REFERENCE[name](**theirs_settings)


def fake_model(sample: torch.Tensor, t) -> torch.Tensor:
    """A fixed function of (x_t, t) standing in for the U-Net, so that a wrong coefficient shows."""
    g = torch.Generator().manual_seed(int(float(t)))
    return 0.7 * sample + 0.3 * torch.randn(sample.shape, generator=g)


CASES = [("ddim", 50, dict(eta=0.6)), ("ddim", 10, dict(eta=1.0, prediction_type="v_prediction")), ("ddpm", 50, {}), ("ddpm", 20, dict(prediction_type="v_prediction", timestep_spacing="trailing")),
         ("ddpm", 10, dict(clip_sample=True, timestep_spacing="linspace")),
         ("ddim", 50, {}), ("ddim", 10, dict(prediction_type="v_prediction")),
         ("ddim", 25, dict(timestep_spacing="trailing", set_alpha_to_one=True)),
         ("euler", 20, {}), ("euler", 20, dict(timestep_spacing="trailing")),
         ("euler", 13, dict(timestep_spacing="linspace", prediction_type="v_prediction"))]


@pytest.mark.parametrize("name, steps, changes", CASES, ids=[f"{n}-{s}-{'-'.join(map(str, c.values())) or 'sd'}"
                                                             for n, s, c in CASES])
def test_every_step_equals_the_diffusers_scheduler(name, steps, changes):
    changes = dict(changes)
    eta = changes.pop("eta", 0.0)  # DDIM's: 0 deterministic, > 0 adds noise
    ours, theirs = schedulers(name, **changes)
    sampler = make_sampler(name, ours, steps, eta)
    theirs.set_timesteps(steps)
    torch.testing.assert_close(sampler.timesteps.to(theirs.timesteps.dtype), theirs.timesteps, rtol=0, atol=0)
    assert float(sampler.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(theirs.init_noise_sigma)
    for i, t in enumerate(theirs.timesteps):
        scaled = theirs.scale_model_input(sample, t)
        torch.testing.assert_close(sampler.scale_model_input(sample, i), scaled, **TOL)
        out = fake_model(scaled, t)
        kw = {"eta": eta} if name == "ddim" else {}
        want = theirs.step(out, t, sample, generator=torch.Generator().manual_seed(i), **kw).prev_sample
        got = sampler.step(out, i, sample, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(got, want, **TOL)
        sample = want


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_and_training_target_equal_diffusers(prediction_type):
    ours, theirs = schedulers("ddpm", prediction_type=prediction_type)
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), **TOL)
    want = noise if prediction_type == "epsilon" else theirs.get_velocity(x0, noise, t)
    torch.testing.assert_close(ours.target(x0, noise, t), want, **TOL)


def test_the_closed_form_is_the_same_as_noising_step_by_step():
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps has the law of t single steps x <- sqrt(1 - b) x + sqrt(b) z:
    over many samples of one pixel, mean and variance agree."""
    ours = NoiseSchedule(SchedulerConfig())
    x0 = torch.full((200_000,), 0.8)
    g = torch.Generator().manual_seed(0)
    x = x0.clone()
    for b in ours.betas[:300]:
        x = (1 - b) ** 0.5 * x + b ** 0.5 * torch.randn(x.shape, generator=g)
    closed = ours.add_noise(x0[:, None], torch.randn(x0.shape, generator=g)[:, None], torch.full((200_000,), 299))
    assert float(x.mean()) == pytest.approx(float(closed.mean()), abs=0.01)
    assert float(x.var()) == pytest.approx(float(closed.var()), abs=0.01)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, "ten"])
def test_a_bad_step_count_is_refused(steps):
    with pytest.raises(ValueError, match="--steps must be a whole number from 1 to the 1000"):
        make_sampler("ddim", NoiseSchedule(SchedulerConfig()), steps)


def test_a_bad_sampler_or_eta_is_refused():
    schedule = NoiseSchedule(SchedulerConfig())
    with pytest.raises(ValueError, match="--sampler 'plms' is not one of ddpm, ddim, euler"):
        make_sampler("plms", schedule, 10)
    with pytest.raises(ValueError, match=r"--eta must be in \[0, 1\]"):
        make_sampler("ddim", schedule, 10, eta=-1)

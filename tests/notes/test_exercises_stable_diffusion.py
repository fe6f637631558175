"""The answers to the exercises of notes/stable-diffusion.md, computed from the zoo's code and compared with the
hints the note gives."""

import math

import pytest
import torch

from architectures.stable_diffusion.config import SchedulerConfig, components, preset
from architectures.stable_diffusion.pipeline import StableDiffusion, generate
from architectures.stable_diffusion.scheduler import DDIMSampler, NoiseSchedule
from architectures.stable_diffusion.unet import UNet2DConditionModel


def by_hand_alpha_bar(t: int, start: float = 0.00085, end: float = 0.012, T: int = 1000) -> float:
    """prod over s <= t of (1 - b_s), b_s linear in sqrt(b) from start to end (t counted from 0), in float64."""
    betas = [(math.sqrt(start) + s / (T - 1) * (math.sqrt(end) - math.sqrt(start))) ** 2 for s in range(T)]
    return math.prod(1 - b for b in betas[:t + 1])


def test_alpha_bar_of_the_scaled_linear_schedule(hints):
    schedule = NoiseSchedule(SchedulerConfig())
    assert (f"{schedule.betas[0].item():.5f}", f"{schedule.betas[999].item():.3f}") == ("0.00085", "0.012")
    for t in (299, 999):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(by_hand_alpha_bar(t), rel=1e-5)
    assert (f"{by_hand_alpha_bar(299):.4f}", f"{by_hand_alpha_bar(999):.4f}") == ("0.5922", "0.0047")
    assert "abar_299 = 0.5922 and abar_999 = 0.0047" in hints("stable-diffusion")


def test_closed_form_mean_and_std(hints):
    schedule = NoiseSchedule(SchedulerConfig())
    x0, t = torch.full((1, 1, 1, 1), 0.8), torch.tensor([299])
    mean = schedule.add_noise(x0, torch.zeros_like(x0), t).item()
    std = schedule.add_noise(x0, torch.ones_like(x0), t).item() - mean
    a = by_hand_alpha_bar(299)
    assert mean == pytest.approx(math.sqrt(a) * 0.8, rel=1e-5) and std == pytest.approx(math.sqrt(1 - a), rel=1e-5)
    assert (f"{mean:.4f}", f"{std:.4f}") == ("0.6156", "0.6386")
    assert "mean sqrt(0.5922) x 0.8 = 0.6156, standard deviation sqrt(0.4078) = 0.6386" in hints("stable-diffusion")


def test_one_ddim_step_by_hand(hints):
    schedule = NoiseSchedule(components(preset("tiny"))[3])  # trailing spacing, as the tiny pipeline samples
    sampler = DDIMSampler(schedule, 50, eta=0.0)
    t = int(sampler.timesteps[25])
    prev = t - 1000 // 50
    assert (t, prev) == (499, 479)
    a, a_prev = schedule.alphas_cumprod[t].item(), schedule.alphas_cumprod[prev].item()
    x_t, eps = 1.0, 0.5
    x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    got = sampler.step(torch.full((1, 4, 2, 2), eps), 25, torch.full((1, 4, 2, 2), x_t))
    torch.testing.assert_close(got, torch.full_like(got, x_prev))
    assert (f"{a:.4f}", f"{a_prev:.4f}", f"{x0:.4f}", f"{x_prev:.4f}") == ("0.2777", "0.3051", "1.0913", "1.0196")
    text = hints("stable-diffusion")
    assert "x0 = (1 - sqrt(0.7223) x 0.5) / sqrt(0.2777) = 1.0913" in text
    assert "x_479 = sqrt(0.3051) x 1.0913 + sqrt(0.6949) x 0.5 = 1.0196" in text


def test_unet_shapes_of_the_tiny_preset(hints):
    torch.manual_seed(0)
    unet_cfg, _, text_cfg, _ = components(preset("tiny"))
    unet = UNet2DConditionModel(unet_cfg).eval()
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            x = output[0] if isinstance(output, tuple) else output
            shapes[name] = tuple(x.shape[1:])
            if isinstance(output, tuple):
                shapes[name + " skips"] = [tuple(s.shape[1:]) for s in output[1]]
        return hook

    unet.conv_in.register_forward_hook(record("conv_in"))
    for i, block in enumerate(unet.down_blocks):
        block.register_forward_hook(record(f"down {i}"))
    unet.mid_block.register_forward_hook(record("mid"))
    for i, block in enumerate(unet.up_blocks):
        block.register_forward_hook(record(f"up {i}"))
    with torch.no_grad():
        eps = unet(torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.randn(2, 8, text_cfg.hidden_size))
    assert tuple(eps.shape) == (2, 4, 4, 4)
    assert shapes == {"conv_in": (32, 4, 4), "down 0": (32, 2, 2), "down 0 skips": [(32, 4, 4), (32, 2, 2)],
                      "down 1": (64, 2, 2), "down 1 skips": [(64, 2, 2)], "mid": (64, 2, 2),
                      "up 0": (64, 4, 4), "up 1": (32, 4, 4)}
    assert [len(b.resnets) for b in unet.up_blocks] == [2, 2] and len(unet.up_blocks[0].attentions) == 0
    text = hints("stable-diffusion")
    assert "(32, 4, 4) after conv_in; (32, 2, 2) after down 0; (64, 2, 2) after down 1 and the middle; " \
           "(64, 4, 4) after up 0; (32, 4, 4) after up 1" in text
    assert "skips (32, 4, 4) x 2, (32, 2, 2) and (64, 2, 2)" in text


def test_guidance_at_zero_one_and_three(hints):
    torch.manual_seed(0)
    pipe = StableDiffusion.from_config(preset("tiny")).double().eval()  # float64: the one-step x_0 guess divides
    # by sqrt(abar) = 0.07, which would turn the rounding of a batch of 2B against two of B into 1e-4
    with torch.no_grad():  # random init leaves some projections at zero: perturb every weight, so the text matters
        for p in pipe.parameters():
            p.add_(0.1 * torch.randn_like(p))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).double()
    prompts = ["a 3", "a 7"]  # the byte tokenizer of an untrained pipeline: short prompts fit its 8-token context

    def one_step(eps_of):  # the DDIM step generate takes from the same noise, with eps given by eps_of(cond, uncond)
        sampler = DDIMSampler(pipe.scheduler, 1)
        t = sampler.timesteps[0]
        with torch.no_grad():
            cond = pipe.unet(noise, t, pipe.encode_prompts(prompts))
            uncond = pipe.unet(noise, t, pipe.encode_prompts(["", ""]))
        assert (cond - uncond).abs().max() > 1e-3, "the prompt changes the prediction"
        return sampler.step(eps_of(cond, uncond), 0, noise)

    run = lambda g: generate(pipe, prompts, steps=1, guidance=g, latents=noise, output="latents")  # noqa: E731
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(run(0.0), one_step(lambda c, u: u), **tol)
    torch.testing.assert_close(run(1.0), one_step(lambda c, u: c), **tol)
    torch.testing.assert_close(run(3.0), one_step(lambda c, u: 3 * c - 2 * u), **tol)
    text = hints("stable-diffusion")
    assert "g = 0 gives eps(x, empty) alone, g = 1 eps(x, c) alone" in text
    assert "g = 3 gives 3 eps(x, c) - 2 eps(x, empty)" in text

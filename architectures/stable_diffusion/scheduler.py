"""The noise schedule, the training target, and three samplers: DDPM, DDIM and Euler.

Forward process (notes/stable-diffusion.md derives it): with betas b_1..b_T and
alpha_bar_t = prod_{s<=t} (1 - b_s), a clean latent x_0 noised to step t is, in closed form,

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,    eps ~ N(0, I).

The U-Net learns eps (epsilon prediction) or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
(v-prediction). A sampler walks from pure noise at t = T to t = 0 through N of the T steps; each
step first turns the model's output into a guess of x_0 and of eps, then:

- DDPM draws x_{t'} from the Gaussian posterior q(x_{t'} | x_t, x_0) (fresh noise every step);
- DDIM moves deterministically along the guessed eps (eta = 0), or adds eta times DDPM's noise;
- Euler integrates the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar), where
  the latent is x_0 + sigma eps: x <- x + (x - x_0) / sigma * (sigma' - sigma).

Every formula and its float32 arithmetic follow diffusers' DDPMScheduler, DDIMScheduler and
EulerDiscreteScheduler (tested to 1e-6); the samplers keep their position as a step index
instead of searching the timestep list.
"""

from __future__ import annotations

import numpy as np
import torch

from architectures.stable_diffusion.config import SchedulerConfig

SAMPLERS = ("ddpm", "ddim", "euler")


def per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over a (B, C, H, W) batch."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped like `like`, drawn where the generator lives (a CPU generator on a GPU run:
    drawn on the CPU and copied, so a seed gives the same noise on every device, as diffusers does)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


class NoiseSchedule:
    def __init__(self, config: SchedulerConfig):
        self.config = c = config
        if c.beta_schedule == "scaled_linear":  # linear in sqrt(beta): SD's schedule
            self.betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps,
                                        dtype=torch.float32) ** 2
        elif c.beta_schedule == "linear":  # DDPM's
            self.betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {c.beta_schedule!r} is not supported (scaled_linear or linear)")
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # alpha_bar_t, t = 0..T-1

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for a (B,) batch of steps t."""
        a = per_sample(self.alphas_cumprod, t, x0)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net is trained to output at x_t: eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
        if self.config.prediction_type == "epsilon":
            return noise
        a = per_sample(self.alphas_cumprod, t, x0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * x0

    def x0_and_eps(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar) -> tuple:
        """The model's guess of x_0 and of eps at a latent x_t of noise level alpha_bar."""
        a, b = alpha_bar, 1 - alpha_bar
        if self.config.prediction_type == "epsilon":
            x0, eps = (sample - b ** 0.5 * model_output) / a ** 0.5, model_output
        else:  # v-prediction: x_0 = sqrt(a) x_t - sqrt(b) v, eps = sqrt(a) v + sqrt(b) x_t
            x0, eps = a ** 0.5 * sample - b ** 0.5 * model_output, a ** 0.5 * model_output + b ** 0.5 * sample
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def timesteps(self, steps: int) -> np.ndarray:
        """The N of T steps a sampler visits, from noisiest to cleanest, as `timestep_spacing` picks them."""
        T, c = self.num_train_timesteps, self.config
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(f"--steps must be a whole number from 1 to the {T} training steps, got {steps!r}")
        if c.timestep_spacing == "leading":  # 0, T/N, 2T/N, ... (+ steps_offset): never reaches t = T - 1
            t = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + c.steps_offset
            if t[0] >= T:
                raise ValueError(f"--steps {steps} with 'leading' spacing and steps_offset={c.steps_offset} would start at "
                                 f"step {t[0]}, past the schedule's last ({T - 1}); use fewer steps")
            return t
        if c.timestep_spacing == "trailing":  # T - 1, T - 1 - T/N, ...: starts at the noisiest step
            return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)  # "linspace"


class DDPMSampler:
    """Ancestral sampling: x_{t'} ~ q(x_{t'} | x_t, x_0 = the model's guess), variance "fixed_small"."""

    def __init__(self, schedule: NoiseSchedule, steps: int):
        self.schedule = schedule
        self.timesteps = torch.from_numpy(schedule.timesteps(steps).copy())
        self.init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        return sample

    def step(self, model_output, i: int, sample, generator: torch.Generator | None = None) -> torch.Tensor:
        ac = self.schedule.alphas_cumprod
        t = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t, a_prev = ac[t], ac[prev] if prev >= 0 else torch.tensor(1.0)
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t  # the beta of the jump t -> prev
        x0, _ = self.schedule.x0_and_eps(model_output, sample, a_t)
        # The posterior mean: a weighted average of the guessed x_0 and the current x_t.
        mean = (a_prev ** 0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t ** 0.5 * (1 - a_prev) / (1 - a_t)) * sample
        if t == 0:
            return mean
        variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
        return mean + variance ** 0.5 * draw_noise(model_output, generator)


class DDIMSampler:
    """x_{t'} = sqrt(a') x_0 + sqrt(1 - a' - s^2) eps + s z, s = eta * the DDPM posterior's std; eta = 0 is
    deterministic, the discretised ODE (notes/stable-diffusion.md)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, eta: float = 0.0):
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {eta}")
        self.schedule, self.eta, self.steps = schedule, float(eta), steps
        self.timesteps = torch.from_numpy(schedule.timesteps(steps).copy())
        c = schedule.config
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else schedule.alphas_cumprod[0]
        self.init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        return sample

    def step(self, model_output, i: int, sample, generator: torch.Generator | None = None) -> torch.Tensor:
        ac = self.schedule.alphas_cumprod
        t = int(self.timesteps[i])
        prev = t - self.schedule.num_train_timesteps // self.steps
        a_t, a_prev = ac[t], ac[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self.schedule.x0_and_eps(model_output, sample, a_t)
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        out = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            out = out + std * draw_noise(model_output, generator)
        return out


class EulerSampler:
    """Euler's method on the probability-flow ODE in sigma; the U-Net sees x / sqrt(sigma^2 + 1), the
    latent rescaled to the variance it was trained on."""

    def __init__(self, schedule: NoiseSchedule, steps: int):
        self.schedule = schedule
        ac = schedule.alphas_cumprod
        t = schedule.timesteps(steps) if schedule.config.timestep_spacing != "linspace" else \
            np.linspace(0, schedule.num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
        all_sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # sigma_t for t = 0..T-1, computed in float32
        sigmas = np.interp(t.astype(np.float32), np.arange(len(all_sigmas)), all_sigmas)  # fractional t interpolate
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # ..., then sigma = 0
        self.timesteps = torch.from_numpy(t.astype(np.float32))
        top = self.sigmas.max()
        self.init_noise_sigma = top if schedule.config.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        return sample / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def step(self, model_output, i: int, sample, generator: torch.Generator | None = None) -> torch.Tensor:
        sigma, dtype = self.sigmas[i], model_output.dtype
        sample = sample.float()
        if self.schedule.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v-prediction, in the sigma parametrisation
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        derivative = (sample - x0) / sigma  # dx/dsigma = the scaled noise
        return (sample + derivative * (self.sigmas[i + 1] - sigma)).to(dtype)


def make_sampler(name: str, schedule: NoiseSchedule, steps: int, eta: float = 0.0):
    """The sampler called `name` ("ddpm", "ddim", "euler") over `steps` of the schedule's steps."""
    if name == "ddpm":
        return DDPMSampler(schedule, steps)
    if name == "ddim":
        return DDIMSampler(schedule, steps, eta)
    if name == "euler":
        return EulerSampler(schedule, steps)
    raise ValueError(f"--sampler {name!r} is not one of {', '.join(SAMPLERS)}")

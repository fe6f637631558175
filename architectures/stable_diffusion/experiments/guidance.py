"""How often does a sample drawn for "the digit N" show an N? Accuracy, judged by a classifier trained on
the real digits, against the guidance scale and against the sampler and its steps; and the figures
of notes/stable-diffusion.md.

    python -m architectures.stable_diffusion.train --preset tiny       # first: the pipeline it samples
    python -m architectures.stable_diffusion.experiments.guidance --checkpoint runs/stable_diffusion-tiny

1. the classifier (experiments/classifier.py), trained on the training split, scored on the held-out one;
2. for each guidance scale g, `--per-class` samples of each of the ten prompts "the digit zero" ...
   "the digit nine" with DDIM, 50 steps (g = 0 is the unconditional model: chance is 10%);
3. at `--sampler-guidance`, DDPM with all 1000 steps, DDIM with 50 and Euler with 20, from the same noise;
4. the figures (with --figures DIR): noising a digit in pixel and latent space, a denoising
   trajectory, the guidance sweep and the sampler comparison; each names this command, the machine
   and the time it took. Every figure and number is printed and written to OUT/results.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from architectures.stable_diffusion.digits import NAMES, caption, load_digits
from architectures.stable_diffusion.experiments.classifier import accuracy, trained_classifier
from architectures.stable_diffusion.experiments.plots import draw_guidance, draw_noising, draw_samplers, draw_trajectory
from architectures.stable_diffusion.pipeline import StableDiffusion, check_guidance, generate
from architectures.stable_diffusion.pretrained import from_pretrained
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, device_label, resolve_device
from architectures.utils.files import atomic_write_json

COMMAND = "python -m architectures.stable_diffusion.experiments.guidance"
SAMPLER_RUNS = (("ddpm", 1000), ("ddim", 50), ("euler", 20))


def parse(argv=None):
    p = ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/stable_diffusion-tiny", help="the trained pipeline to sample")
    p.add_argument("--out", default="runs/stable_diffusion-guidance", help="folder of results.json and the classifier")
    p.add_argument("--guidance", default="0,1,1.5,2,3,5,8", help="comma-separated guidance scales of the sweep")
    p.add_argument("--per-class", type=int, default=20, help="samples per prompt at each guidance scale")
    p.add_argument("--sampler-guidance", type=float, default=3.0, help="guidance of the sampler comparison")
    p.add_argument("--ddpm-per-class", type=int, default=10, help="samples per prompt of the 1000-step DDPM run")
    p.add_argument("--figures", default=None, help="folder to draw the note's figures in (none if not given)")
    p.add_argument("--seed", type=int, default=0, help="seeds the starting noise (the same for every run)")
    add_device_option(p)
    a = p.parse_args(argv)
    try:
        a.guidance = [float(g) for g in a.guidance.split(",")]
    except ValueError:
        raise ValueError(f"--guidance must be comma-separated numbers, got {a.guidance!r}") from None
    for g in (*a.guidance, a.sampler_guidance):
        check_guidance(g)
    if min(a.per_class, a.ddpm_per_class) < 1:
        raise ValueError("--per-class and --ddpm-per-class must be >= 1")
    return a


def measure(pipe: StableDiffusion, judge, sampler: str, steps: int, guidance: float, per_class: int, seed: int) -> dict:
    """Sample `per_class` images of each prompt; the fraction the judge labels as prompted."""
    labels = torch.arange(len(NAMES)).repeat_interleave(per_class)
    prompts = [caption(int(c)) for c in labels]
    t0 = time.perf_counter()
    images = generate(pipe, prompts, steps, guidance, sampler, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    acc = accuracy(judge, images * 2 - 1, labels)
    per_prompt = [accuracy(judge, images[labels == c] * 2 - 1, labels[labels == c]) for c in range(len(NAMES))]
    print(f"sampler={sampler} steps={steps} guidance={guidance:g} samples={len(labels)} accuracy={acc:.4f} "
          f"seconds={seconds:.1f}", flush=True)
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "samples": len(labels), "accuracy": acc,
            "per_prompt": per_prompt, "seconds": seconds, "seconds_per_image": seconds / len(labels),
            "one_per_class": images[::per_class].cpu()}


@torch.no_grad()
def noising(pipe: StableDiffusion, image: torch.Tensor, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One digit (1, 1, S, S) noised at each step, in pixel space and in (decoded) latent space, in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(steps)
    x0 = image.repeat(len(steps), 1, 1, 1)
    pixels = pipe.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    scale = pipe.vae.config.scaling_factor
    z0 = (pipe.vae.encode(image)[0] * scale).repeat(len(steps), 1, 1, 1)
    latents = pipe.scheduler.add_noise(z0, torch.randn(z0.shape, generator=g), t)
    decoded = pipe.vae.decode(latents / scale)
    return (pixels / 2 + 0.5).clamp(0, 1), (decoded / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def trajectory(pipe: StableDiffusion, shown: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM, 50 steps, "the digit three": z_t and the guessed x_0 at the `shown` steps, decoded to [0, 1]."""
    kept = {}
    generate(pipe, [caption(3)], 50, 3.0, "ddim", generator=torch.Generator().manual_seed(seed),
             callback=lambda i, z, x0: kept.__setitem__(i, (z, x0)) if i in shown else None)
    scale = pipe.vae.config.scaling_factor
    decode = lambda zs: (pipe.vae.decode(torch.cat(zs) / scale) / 2 + 0.5).clamp(0, 1)  # noqa: E731
    return decode([kept[i][0] for i in shown]), decode([kept[i][1] for i in shown])


def figures(pipe, digits, a, sweep, samplers, judge_acc, folder: Path, machine: str, t_sweep: float, t_samplers: float):
    folder.mkdir(parents=True, exist_ok=True)
    footer = lambda seconds: f"{COMMAND} --checkpoint {a.checkpoint} | {machine} | {seconds:.1f} s"  # noqa: E731
    t0 = time.perf_counter()
    steps = [0, 50, 150, 300, 500, 750, 999]
    three = digits.val_images[digits.val_labels == 3][:1]
    pixels, latents = noising(pipe, three, steps)
    draw_noising(pixels, latents, steps, folder / "sd-noising.png", footer(time.perf_counter() - t0))
    t0, shown = time.perf_counter(), [0, 10, 20, 30, 40, 45, 49]
    zs, guesses = trajectory(pipe, shown, a.seed)
    draw_trajectory(zs, guesses, shown, folder / "sd-trajectory.png", footer(time.perf_counter() - t0))
    draw_guidance(sweep, {r["guidance"]: r["one_per_class"] for r in sweep}, 1 / len(NAMES), judge_acc,
                  folder / "sd-guidance.png", footer(t_sweep))
    draw_samplers(samplers, {f"{r['sampler']} {r['steps']}": r["one_per_class"] for r in samplers},
                  folder / "sd-samplers.png", footer(t_samplers))
    print(f"figures: {', '.join(str(folder / n) for n in ('sd-noising.png', 'sd-trajectory.png', 'sd-guidance.png', 'sd-samplers.png'))}")


@command_line
def main(argv=None) -> dict:
    a = parse(argv)
    t_start = time.perf_counter()
    device = resolve_device(a.device)
    # a shared machine says so: its load average when the experiment started
    machine = (f"{device_label(device)}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
               if device.type == "cpu" else device_label(device))
    pipe = from_pretrained(a.checkpoint, device=device)
    digits = load_digits(pipe.vae.config.sample_size)
    out = Path(a.out)
    judge = trained_classifier(digits, out / "classifier.safetensors", device=str(device))
    judge_acc = accuracy(judge, digits.val_images.to(device), digits.val_labels)
    print(f"classifier: {judge_acc:.4f} accuracy on the {len(digits.val_labels)} held-out real digits", flush=True)
    t0 = time.perf_counter()
    sweep = [measure(pipe, judge, "ddim", 50, g, a.per_class, a.seed) for g in a.guidance]
    t_sweep, t0 = time.perf_counter() - t0, time.perf_counter()
    samplers = [measure(pipe, judge, s, n, a.sampler_guidance, a.ddpm_per_class if s == "ddpm" else a.per_class, a.seed)
                for s, n in SAMPLER_RUNS]
    t_samplers = time.perf_counter() - t0
    if a.figures:
        figures(pipe, digits, a, sweep, samplers, judge_acc, Path(a.figures), machine, t_sweep, t_samplers)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "one_per_class"} for r in rs]  # noqa: E731
    results = {"checkpoint": a.checkpoint, "classifier_accuracy": judge_acc, "guidance_sweep": strip(sweep),
               "samplers": strip(samplers), "machine": machine, "total_s": time.perf_counter() - t_start}
    atomic_write_json(out / "results.json", results)
    print(f"results in {out / 'results.json'}; {results['total_s']:.0f} s in all ({machine})", flush=True)
    return results


if __name__ == "__main__":
    main()

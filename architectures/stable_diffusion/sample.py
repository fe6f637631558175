"""Sample images from a Stable Diffusion pipeline directory (the train script's, or any diffusers-format
one this family loads) and write them as a PNG grid.

    python -m architectures.stable_diffusion.sample --checkpoint runs/stable_diffusion-tiny \\
        --prompt "the digit seven" --steps 50 --guidance 3 --sampler ddim --num 16 --out seven.png

`--prompt` may be given several times (a row of the grid each). `--guidance 1` is the conditional
model alone; 0 is the unconditional model (the empty prompt's prediction alone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from architectures.stable_diffusion.images import save_grid
from architectures.stable_diffusion.pipeline import check_guidance, generate
from architectures.stable_diffusion.pretrained import from_pretrained
from architectures.stable_diffusion.scheduler import SAMPLERS
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, resolve_device


def number(text: str) -> float:
    """argparse type of --guidance: a number, said in one line otherwise."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number (1: no guidance, 3 or 7.5: guided), got {text!r}") from None


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m architectures.stable_diffusion.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a diffusers-format pipeline directory (model_index.json, "
                                                       "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    p.add_argument("--prompt", action="append", required=True, help="the text to draw; repeat for several rows")
    p.add_argument("--steps", type=whole, default=50, help="sampler steps (1 to the schedule's training steps)")
    p.add_argument("--guidance", type=number, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", help=f"the sampler: {', '.join(SAMPLERS)}")
    p.add_argument("--eta", type=number, default=0.0, help="DDIM's noise: 0 deterministic, 1 as much as DDPM")
    p.add_argument("--num", type=whole, default=8, help="images per prompt (the grid's columns)")
    p.add_argument("--seed", type=whole, default=0, help="seeds the starting noise")
    p.add_argument("--out", default="samples.png", help="the PNG file to write")
    add_device_option(p)
    a = p.parse_args(argv)
    check_guidance(a.guidance)
    if a.num < 1:
        raise ValueError(f"--num must be >= 1, got {a.num}")
    if a.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {a.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if a.eta != 0 and a.sampler != "ddim":
        raise ValueError(f"--eta is DDIM's noise; --sampler {a.sampler} takes none (DDPM always adds its own, Euler none)")
    return a


@command_line
def main(argv=None) -> Path:
    a = parse(argv)
    device = resolve_device(a.device)
    pipe = from_pretrained(a.checkpoint, device=device)
    prompts = [prompt for prompt in a.prompt for _ in range(a.num)]
    pipe.tokenizer(prompts, pipe.context)  # a prompt longer than the context is refused before any sampling
    t0 = time.perf_counter()
    images = generate(pipe, prompts, a.steps, a.guidance, a.sampler, a.eta, generator=torch.Generator().manual_seed(a.seed))
    out = Path(a.out)
    save_grid(images, out, rows=len(a.prompt))
    print(f"{len(prompts)} images, {a.sampler} {a.steps} steps, guidance {a.guidance:g}, in "
          f"{time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    return out


if __name__ == "__main__":
    main()

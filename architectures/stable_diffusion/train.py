"""Train a tiny Stable Diffusion on handwritten digits, with the zoo's one training loop.

    python -m architectures.stable_diffusion.train --preset tiny          # a 2-core CPU
    python -m architectures.stable_diffusion.train --device cuda --compile  # a GPU, bf16 autocast, compiled

Latent diffusion trains in two stages, each a run of the loop (training/trainer.py) with its own
loss (architectures/stable_diffusion/losses.py) and batch sampler (batches.py):
1. the VAE (`vae_loss`), checkpointed in OUT/autoencoder/; its latents' standard deviation then
   fixes `scaling_factor`, so that diffusion sees latents of unit variance, as SD 1.x's 0.18215 does;
2. the U-Net and the CLIP text encoder together (`diffusion_loss`), on the frozen VAE's latents of the
   digits (architectures/stable_diffusion/digits.py), each captioned by its class in words ("the digit
   seven"), with 10% of the captions emptied for classifier-free guidance. OUT is then a diffusers-format
   pipeline, which `python -m architectures.stable_diffusion.sample --checkpoint OUT` samples.
The end of the run draws OUT/samples.png (a row per class) and writes summary.json, with the
U-Net stage's images/s. `--resume` continues whichever stage was interrupted.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from architectures.stable_diffusion.batches import diffusion_batches, vae_batches
from architectures.stable_diffusion.config import components
from architectures.stable_diffusion.config import preset as model_preset
from architectures.stable_diffusion.digits import NAMES, all_captions, caption, load_digits
from architectures.stable_diffusion.images import save_grid
from architectures.stable_diffusion.losses import diffusion_loss, vae_loss
from architectures.stable_diffusion.pipeline import StableDiffusion, check_guidance, generate
from architectures.stable_diffusion.pretrained import load_vae, save_pretrained, save_vae
from architectures.stable_diffusion.scheduler import SAMPLERS, NoiseSchedule, make_sampler
from architectures.stable_diffusion.text_encoder import CLIPTextModel
from architectures.stable_diffusion.tokenizer import train_tokenizer
from architectures.stable_diffusion.unet import UNet2DConditionModel
from architectures.stable_diffusion.vae import AutoencoderKL
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import device_label, resolve_device
from architectures.utils.files import atomic_write_json, read_jsonl
from training.checkpointing import STATE_FILE
from training.cli import parse, say
from training.recipes import Recipe
from training.train_config import TrainConfig
from training.trainer import train

FAMILY, VAE_DIR = "stable_diffusion", "autoencoder"


@dataclass
class DigitsConfig:
    dataset: str = "digits"  # the image set: "digits" (scikit-learn's handwritten digits, upsampled; offline)
    caption_dropout: float = 0.1  # fraction of training captions replaced by the empty prompt (guidance needs it)
    vae_steps: int = 600  # optimizer steps of the VAE stage, before the U-Net's
    vae_batch_size: int = 32  # images per VAE step
    vae_lr: float = 2e-3  # peak learning rate of the VAE stage
    kl_weight: float = 1e-4  # weight of the VAE's KL term against its reconstruction error
    sample_steps: int = 50  # sampler steps of the end-of-run grid
    sample_guidance: float = 3.0  # classifier-free guidance scale of the end-of-run grid
    sample_sampler: str = "ddim"  # sampler of the end-of-run grid: ddpm, ddim or euler


RECIPES = {
    "tiny": Recipe(model=model_preset("tiny"), data=DigitsConfig(), train=TrainConfig(
        max_steps=1500, batch_size=64, lr=2e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.0,
        eval_interval=500, eval_batches=4, log_interval=50)),
}


def check_data(data: DigitsConfig) -> None:
    if data.dataset != "digits":
        raise ValueError(f"--dataset {data.dataset!r}: the only image set is 'digits'")
    if not 0.0 <= data.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {data.caption_dropout}")
    for name in ("vae_steps", "vae_batch_size", "sample_steps"):
        if getattr(data, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(data, name)}")
    if data.sample_sampler not in SAMPLERS:
        raise ValueError(f"--sample-sampler {data.sample_sampler!r} is not one of {', '.join(SAMPLERS)}")
    check_guidance(data.sample_guidance)
    make_sampler(data.sample_sampler, NoiseSchedule(components(model_preset("tiny"))[3]), data.sample_steps)


def resume_argv(argv: list[str] | None) -> list[str] | None:
    """--resume before the U-Net stage has written a checkpoint means resuming the VAE stage alone, which
    its own folder's checkpoint does; the shared command line would find no checkpoint in OUT."""
    first = ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--preset", default="tiny", help="the recipe")
    first.add_argument("--out", default=None, help="the output directory")
    first.add_argument("--resume", action="store_true", help="continue the run in --out")
    known = first.parse_known_args(argv)[0]
    out = Path(known.out or f"runs/{FAMILY}-{known.preset}")
    if known.resume and not (out / STATE_FILE).is_file() and (out / VAE_DIR / STATE_FILE).is_file():
        return [a for a in (argv or []) if a != "--resume"]
    return argv


def train_vae(cfg, data: DigitsConfig, train_cfg: TrainConfig, digits, out: Path) -> AutoencoderKL:
    """Stage 1, in OUT/autoencoder (resumed, or a no-op when finished, if its checkpoint is there)."""
    vae_cfg = components(cfg)[1]
    vae_train = dataclasses.replace(train_cfg, max_steps=data.vae_steps, batch_size=data.vae_batch_size,
                                    lr=data.vae_lr, min_lr=data.vae_lr / 10, warmup_steps=min(50, data.vae_steps),
                                    eval_interval=data.vae_steps, checkpoint_interval=0)
    torch.manual_seed(train_cfg.seed)
    vae = AutoencoderKL(vae_cfg)
    size = cfg.image_size // 2 ** (cfg.vae_levels - 1)
    resume = (out / VAE_DIR / STATE_FILE).is_file()
    say(f"stage 1: VAE, {sum(p.numel() for p in vae.parameters()):,} parameters, {cfg.image_size}x{cfg.image_size} "
        f"-> {size}x{size}x{cfg.latent_channels}; {data.vae_steps} steps into {out / VAE_DIR}"
        + (" (resumed)" if resume else ""))
    train(vae, vae_loss(data.kl_weight), vae_batches(digits, (cfg.latent_channels, size, size)), vae_train,
          out / VAE_DIR, save_model=save_vae, resume=resume, loss_label="VAE loss (MSE + KL)",
          config_record={"model": dataclasses.asdict(vae_cfg), "data": dataclasses.asdict(data)})
    return load_vae(out / VAE_DIR)  # the checkpoint, so a resumed run continues with exactly these weights


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, digits) -> tuple[dict, float]:
    """Each split's latent means and standard deviations, scaled to unit variance, and the scale."""
    raw = {}
    for split, images in (("train", digits.train_images), ("val", digits.val_images)):
        mean, logvar = zip(*(vae.encode(chunk) for chunk in images.split(256)))
        raw[split] = (torch.cat(mean), torch.cat(logvar).mul(0.5).exp())
    mean, std = raw["train"]
    g = torch.Generator().manual_seed(0)
    scale = 1.0 / float((mean + std * torch.randn(mean.shape, generator=g)).std())
    return {split: (m * scale, s * scale) for split, (m, s) in raw.items()}, scale


def images_per_s(metrics: Path) -> float | None:
    """The U-Net stage's images/s: the mean over its log windows after the first (which holds the warm-up)."""
    rates = [e["tokens_per_s"] for e in read_jsonl(metrics) if "tokens_per_s" in e] if metrics.is_file() else []
    rates = rates[1:] or rates
    return sum(rates) / len(rates) if rates else None


def sample_grid(pipe: StableDiffusion, data: DigitsConfig, out: Path, per_class: int = 8) -> None:
    prompts = [caption(c) for c in range(len(NAMES)) for _ in range(per_class)]
    images = generate(pipe, prompts, data.sample_steps, data.sample_guidance, data.sample_sampler,
                      generator=torch.Generator().manual_seed(0))
    save_grid(images, out / "samples.png", rows=len(NAMES))


@command_line
def main(argv=None) -> dict:
    args = parse(resume_argv(argv), RECIPES, FAMILY, prog=f"python -m architectures.{FAMILY}.train",
                 about="Train a tiny Stable Diffusion (VAE, then U-Net + text encoder) on handwritten digits")
    cfg, train_cfg, data = args.recipe.model, args.recipe.train, args.recipe.data
    check_data(data)
    unet_cfg, _, text_cfg, sched_cfg = components(cfg)
    t_start = time.perf_counter()
    digits = load_digits(cfg.image_size)
    tokenizer = train_tokenizer(all_captions(), cfg.vocab_size, cfg.context)
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    say(f"data: {len(digits.train_labels):,} train and {len(digits.val_labels):,} held-out digits at "
        f"{cfg.image_size}x{cfg.image_size}; tokenizer: {tokenizer.vocab_size} tokens")
    vae = train_vae(cfg, data, train_cfg, digits, args.out)
    latents, scale = encode_latents(vae, digits)
    vae.config.scaling_factor = scale
    vae.requires_grad_(False)  # frozen in stage 2: the optimizer takes only parameters that need gradients
    torch.manual_seed(train_cfg.seed)
    text_cfg = dataclasses.replace(text_cfg, vocab_size=tokenizer.vocab_size)
    pipe = StableDiffusion(UNet2DConditionModel(unet_cfg), vae, CLIPTextModel(text_cfg), tokenizer, sched_cfg, cfg)
    say(f"stage 2: U-Net {sum(p.numel() for p in pipe.unet.parameters()):,} + text encoder "
        f"{sum(p.numel() for p in pipe.text_encoder.parameters()):,} parameters on latents scaled by {scale:.4f}; "
        f"{train_cfg.max_steps} steps into {args.out}" + (" (resumed)" if args.resume else ""))
    labels = {"train": digits.train_labels, "val": digits.val_labels}
    result = train(pipe, diffusion_loss, diffusion_batches(latents, labels, tokenizer, pipe.context, data.caption_dropout,
                                                          sched_cfg.num_train_timesteps),
                   train_cfg, args.out, save_model=save_pretrained, resume=args.resume, loss_label="train loss (noise MSE)",
                   config_record={"model": dataclasses.asdict(cfg), "data": dataclasses.asdict(data)})
    pipe.eval()
    sample_grid(pipe, data, args.out)
    summary = {"family": FAMILY, "preset": args.preset, "steps": result.step, "vae_steps": data.vae_steps,
               "parameters": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                              for k in ("unet", "vae", "text_encoder")},
               "scaling_factor": scale, "val_loss": result.val_loss, "images_per_s": images_per_s(args.out / "metrics.jsonl"),
               "train_s": result.elapsed_s, "total_s": time.perf_counter() - t_start,
               "device": device_label(resolve_device(train_cfg.device))}
    atomic_write_json(args.out / "summary.json", summary)
    rate = f"{summary['images_per_s']:,.0f} images/s" if summary["images_per_s"] else "images/s not measured"
    print(f"U-Net stage: validation noise MSE {result.val_loss:.4f}; {rate}; {summary['total_s']:.0f} s in all "
          f"({summary['device']})", flush=True)
    print(f"---- pipeline, samples.png, metrics.jsonl and loss.png in {args.out} ----", flush=True)
    return summary


if __name__ == "__main__":
    main()

"""Train the VAE on scikit-learn's 8x8 digits and draw a grid of samples.

    python -m fundamentals.vae.train              # 2-core CPU, about half a minute

Adam on the negative ELBO (model.py), then: the test-set ELBO in nats per image (averaged over
`eval_samples` draws of z per image), and samples.png in --out, an 8x8 grid of the decoder's
pixel means for z ~ N(0, I) (top) beside reconstructions of test digits (bottom).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch

from architectures.utils.command_line import command_line
from fundamentals.cli import AT_LEAST_1, parse_config
from fundamentals.common import load_digits_split, report, start
from fundamentals.vae.model import VAE


@dataclass
class VAEConfig:
    RANGES: ClassVar = {"z": AT_LEAST_1, "eval_samples": AT_LEAST_1}

    hidden: int = 256  # width of the encoder's and decoder's two hidden layers
    z: int = 8  # latent size Z
    epochs: int = 150  # passes over the training images
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # Adam
    eval_samples: int = 10  # draws of z per test image for the reported ELBO
    seed: int = 0  # initial weights, the batch order and the draws of z
    threads: int = 1  # torch's CPU threads; small matrices: one (see fundamentals/nn/train.py)


PRESETS = {"default": VAEConfig(), "tiny": VAEConfig(hidden=32, z=2, epochs=1, eval_samples=1)}


@torch.no_grad()
def test_elbo(model: VAE, x: torch.Tensor, samples: int, g: torch.Generator) -> dict[str, float]:
    model.eval()
    parts = [model.elbo(x, g) for _ in range(samples)]
    model.train()
    return {k: round(torch.stack([p[k] for p in parts]).mean().item(), 3) for k in parts[0]}


def save_grid(samples: torch.Tensor, recon: torch.Tensor, originals: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(6, 9), gridspec_kw={"height_ratios": [8, 2]})
    def tile(imgs, rows):  # (n, 64) -> one (rows*10, cols*10) image, each digit framed by a blank pixel
        framed = torch.nn.functional.pad(imgs.reshape(-1, 8, 8), (1, 1, 1, 1))  # (n, 10, 10)
        return framed.reshape(rows, -1, 10, 10).permute(0, 2, 1, 3).reshape(rows * 10, -1).numpy()

    axes[0].imshow(tile(samples, 8), cmap="gray_r", vmin=0, vmax=1)
    axes[0].set_title("samples: decoder means for z ~ N(0, I)")
    axes[1].imshow(tile(torch.cat([originals, recon]), 2), cmap="gray_r", vmin=0, vmax=1)
    axes[1].set_title("test digits (top) and their reconstructions (bottom)")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@command_line
def main(argv=None) -> dict:
    cfg, out = parse_config(argv, PRESETS, "python -m fundamentals.vae.train", __doc__)
    clock, g = start(cfg)
    x_train, _, x_test, _ = load_digits_split()  # labels unused: the VAE models the images alone
    model = VAE(d=64, hidden=cfg.hidden, z=cfg.z)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), cfg.batch_size):
            loss = -model.elbo(x_train[order[i:i + cfg.batch_size]], g)["elbo"].mean()  # nats per image
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 50 == 49 or epoch == cfg.epochs - 1:
            print(f"epoch {epoch + 1}: train -ELBO {loss.item():.2f} nats/image", flush=True)
    metrics = test_elbo(model, x_test, cfg.eval_samples, g)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model.eval()
        recon = torch.sigmoid(model.decode(model.encode(x_test[:8])[0]))  # decode the posterior mean
    save_grid(model.sample(64, g), recon, x_test[:8], out / "samples.png")
    result = {"task": "digits VAE", "test_elbo_nats_per_image": metrics["elbo"],
              "test_reconstruction_nats": metrics["reconstruction"], "test_kl_nats": metrics["kl"],
              "samples_png": str(out / "samples.png"), "seconds": clock(), "config": asdict(cfg)}
    report(out, result)
    return result


if __name__ == "__main__":
    main()

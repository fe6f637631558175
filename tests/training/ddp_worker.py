"""Run by tests/training/test_distributed.py under torchrun: the toy problem on N processes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, sample_batch, tiny_model  # noqa: E402

from architectures.llama3 import save_pretrained  # noqa: E402
from training.lm import lm_loss  # noqa: E402
from training.trainer import train  # noqa: E402

if __name__ == "__main__":
    out, accum = sys.argv[1], int(sys.argv[2])
    train(tiny_model(), lm_loss, sample_batch, config(max_steps=6, grad_accum_steps=accum, eval_interval=6),
          out, save_model=save_pretrained)

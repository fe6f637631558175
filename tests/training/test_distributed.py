"""DDP under torchrun: 2 CPU processes on the gloo backend reproduce a single-process run
with the same global batch (each process takes half the rows; DDP averages gradients)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures.llama3 import from_pretrained, save_pretrained
from training.lm import lm_loss
from training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, sample_batch, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def torchrun(out: Path, nproc: int, accum: int) -> None:
    env = dict(os.environ, ZOO_DDP_BACKEND="gloo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests/training/ddp_worker.py"), str(out), str(accum)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(out: Path):
    return [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_two_gloo_processes_match_one_process(tmp_path, accum):
    single = tiny_model()
    train(single, lm_loss, sample_batch, config(max_steps=6, eval_interval=6), tmp_path / "single",
          save_model=save_pretrained)
    torchrun(tmp_path / "ddp", nproc=2, accum=accum)
    # Same batches, gradients averaged across ranks instead of within one batch: equal up to
    # fp32 summation order, ~1e-6 relative; 1e-5 leaves room and still catches a wrong average.
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    ddp_model = from_pretrained(tmp_path / "ddp")
    for a, b in zip(ddp_model.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_world_size_is_a_clear_error(monkeypatch):
    from training.trainer import validate

    with pytest.raises(ValueError, match="batch_size=6 is not divisible by world_size x grad_accum_steps = 4 x 1"):
        validate(config(batch_size=6), world_size=4)

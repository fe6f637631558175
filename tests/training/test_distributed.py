"""DDP and FSDP2 under torchrun: 2 CPU processes on the gloo backend reproduce a
single-process run with the same global batch (each process takes half the rows; gradients
are averaged across processes), and a checkpoint saved by 2 processes resumes on 1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures.llama3 import from_pretrained, save_pretrained
from architectures.common.loss import lm_loss
from training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, masked_batch, sample_batch, summed_loss_with_reference, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, nproc: int, accum: int, strategy: str = "ddp", max_steps: int = 6, *extra: str) -> None:
    # A stuck collective raises after 60 s with its name in the log, instead of hanging silently.
    env = dict(os.environ, ZOO_DDP_BACKEND="gloo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ZOO_DIST_TIMEOUT_S="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           str(REPO / "tests/training/ddp_worker.py"), str(out), str(accum), strategy, str(max_steps), *extra]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(out: Path):
    return [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def single_process(out: Path, max_steps: int = 6):
    model = tiny_model()
    train(model, lm_loss, sample_batch, config(max_steps=max_steps, eval_interval=6, checkpoint_interval=3), out,
          save_model=save_pretrained)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("strategy,accum", [("ddp", 1), ("ddp", 2), ("fsdp", 2)])
def test_two_gloo_processes_match_one_process(tmp_path, strategy, accum):
    single = single_process(tmp_path / "single")
    torchrun(tmp_path / "multi", nproc=2, accum=accum, strategy=strategy)
    # Same batches, gradients averaged across processes instead of within one batch: equal up
    # to fp32 summation order (~1e-6 relative); 1e-5 leaves room and still catches a wrong average.
    assert losses(tmp_path / "multi") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    multi_model = from_pretrained(tmp_path / "multi")  # FSDP2's shards gathered into one file
    for a, b in zip(multi_model.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Memory: DDP replicates every parameter (and so its AdamW moments); FSDP2 keeps about half
    # on each of 2 processes (dim-0 shards, so a few rows of padding at most).
    total = sum(p.numel() for p in single.parameters())
    local = [json.loads((tmp_path / "multi" / f"local_params_rank{r}.json").read_text())["local"] for r in (0, 1)]
    if strategy == "ddp":
        assert local == [total, total]
    else:
        assert sum(local) == total and max(local) <= 0.55 * total


@pytest.mark.slow
def test_fsdp_checkpoint_from_two_processes_resumes_on_one(tmp_path):
    """torch.distributed.checkpoint stores each process's shard with the global layout, so the
    step-3 checkpoint of a 2-process FSDP2 run loads into 1 process and continues like the
    single-process run (last 3 losses within fp32 noise)."""
    single_process(tmp_path / "single")
    torchrun(tmp_path / "multi", nproc=2, accum=1, strategy="fsdp", max_steps=3)
    train(tiny_model(seed=99), lm_loss, sample_batch,
          config(max_steps=6, eval_interval=6, checkpoint_interval=3, parallel="fsdp"), tmp_path / "multi",
          save_model=save_pretrained, resume=True)
    assert losses(tmp_path / "multi") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


@pytest.mark.slow
def test_fsdp_with_a_frozen_reference_and_token_counts_matches_one_process(tmp_path):
    """The post-training hooks under FSDP2: the frozen reference is sharded like the model, and
    the supervised tokens are counted over both processes (rank 0's rows hold 16 targets, rank
    1's 48), so two processes with accumulation reproduce one process's losses and weights."""
    single = tiny_model()
    train(single, summed_loss_with_reference, masked_batch, config(max_steps=6, eval_interval=6, checkpoint_interval=3),
          tmp_path / "single", save_model=save_pretrained, frozen={"reference": tiny_model(seed=1)})
    torchrun(tmp_path / "multi", 2, 2, "fsdp", 6, "hooks")
    assert losses(tmp_path / "multi") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    for a, b in zip(from_pretrained(tmp_path / "multi").parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    total = sum(p.numel() for p in single.parameters())
    for name in ("local", "reference"):  # the trained model and the frozen one, each about half per process
        local = [json.loads((tmp_path / "multi" / f"local_params_rank{r}.json").read_text())[name] for r in (0, 1)]
        assert sum(local) == total and max(local) <= 0.55 * total, name


def test_batch_not_divisible_by_world_size_is_a_clear_error():
    from training.train_config import validate

    with pytest.raises(ValueError, match="batch_size=6 is not divisible by world_size x grad_accum_steps = 4 x 1"):
        validate(config(batch_size=6), world_size=4)

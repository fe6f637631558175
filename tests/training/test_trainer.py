"""The shared training loop: schedule, resume, atomic checkpoints, NaN guard, bad configs."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from architectures.llama3 import from_pretrained, save_pretrained
from training import checkpointing
from training.distributed import Distributed
from architectures.common.loss import lm_loss
from training.metrics import plot_losses
from architectures.utils.device import resolve_device
from training.optimizer import lr_at, make_optimizer
from training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, sample_batch, tiny_model  # noqa: E402

def losses(out):
    return [(e["step"], e["loss"]) for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = config(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_applies_to_matrices_only():
    opt = make_optimizer(tiny_model(), config(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_training_reduces_loss_and_writes_checkpoint(tmp_path):
    model = tiny_model()
    result = train(model, lm_loss, sample_batch, config(max_steps=30, eval_interval=30), tmp_path,
                   save_model=save_pretrained, val_units_per_token=0.5)
    logged = losses(tmp_path)
    assert logged[-1][1] < logged[0][1] - 0.2
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    evals = [e for e in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "val_loss" in e]
    assert evals[-1]["val_nats_per_char"] == pytest.approx(0.5 * evals[-1]["val_loss"])
    reloaded = from_pretrained(tmp_path)
    x, _ = sample_batch("val", 2, torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert result.step == 30


class Crash(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Kill a run mid-way (an exception in step 10, after the checkpoint of step 8), resume it,
    and get the losses of the uninterrupted run exactly: batches depend only on (seed, step),
    and weights, AdamW moments, schedule and dropout RNG all come back from the checkpoint."""
    cfg = config(checkpoint_interval=4)
    train(tiny_model(dropout=0.1), lm_loss, sample_batch, cfg, tmp_path / "full", save_model=save_pretrained)

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += model.training  # count training steps, not evaluation batches
        if calls["n"] == 10:
            raise Crash()
        return lm_loss(model, batch)

    with pytest.raises(Crash):
        train(tiny_model(dropout=0.1), crashing_loss, sample_batch, cfg, tmp_path / "resumed", save_model=save_pretrained)
    assert losses(tmp_path / "resumed")[-1][0] == 9
    # A different init proves the weights come from the checkpoint, not from the seed.
    train(tiny_model(seed=123, dropout=0.1), lm_loss, sample_batch, cfg, tmp_path / "resumed",
          save_model=save_pretrained, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_resume_with_changed_config_names_the_fields(tmp_path):
    train(tiny_model(), lm_loss, sample_batch, config(max_steps=2), tmp_path, save_model=save_pretrained)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.003 vs now 0.001.*|batch_size"):
        train(tiny_model(), lm_loss, sample_batch, config(max_steps=4, lr=1e-3), tmp_path,
              save_model=save_pretrained, resume=True)
    # Extending max_steps is what resuming is for, so it is allowed.
    train(tiny_model(), lm_loss, sample_batch, config(max_steps=4), tmp_path, save_model=save_pretrained, resume=True)
    assert losses(tmp_path)[-1][0] == 4


def test_new_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    train(tiny_model(), lm_loss, sample_batch, config(max_steps=1), tmp_path, save_model=save_pretrained)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_model(), lm_loss, sample_batch, config(max_steps=1), tmp_path, save_model=save_pretrained)


def test_crash_before_commit_keeps_previous_checkpoint(tmp_path):
    model = tiny_model()
    train(model, lm_loss, sample_batch, config(max_steps=2), tmp_path, save_model=save_pretrained)
    before = (tmp_path / "model.safetensors").read_bytes()

    def save_then_die(m, d, state):
        save_pretrained(m, d)
        raise Crash()  # dies after writing weights, before the commit marker

    opt = make_optimizer(model, config(), torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(Crash):
        checkpointing.save(tmp_path, model, opt, sched, 3, {}, save_then_die, Distributed())
    checkpointing._recover(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not (tmp_path / checkpointing.PENDING).exists()


def test_crash_after_commit_is_rolled_forward(tmp_path):
    model = tiny_model()
    opt = make_optimizer(model, config(), torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    real_recover = checkpointing._recover
    checkpointing._recover = lambda out: None  # the process dies right after writing COMMIT
    try:
        checkpointing.save(tmp_path, model, opt, sched, 5, {}, save_pretrained, Distributed())
    finally:
        checkpointing._recover = real_recover
    assert not (tmp_path / "trainer_state.pt").exists()
    real_recover(tmp_path)
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 5
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / checkpointing.DCP_DIR).is_dir()


def test_nan_loss_stops_with_the_step(tmp_path):
    calls = {"n": 0}

    def loss_goes_nan(model, batch):
        calls["n"] += 1
        loss, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), m

    with pytest.raises(FloatingPointError, match="step 5"):
        train(tiny_model(), loss_goes_nan, sample_batch, config(log_interval=4, max_steps=8), None)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a, b = tiny_model(), tiny_model()
    train(a, lm_loss, sample_batch, config(max_steps=3, grad_accum_steps=1), None)
    train(b, lm_loss, sample_batch, config(max_steps=3, grad_accum_steps=4), None)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_accumulation_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by world_size x grad_accum_steps"):
        train(tiny_model(), lm_loss, sample_batch, config(batch_size=10, grad_accum_steps=4), None)


def test_missing_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for machines without one")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


def test_compile_without_torch_compile_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(RuntimeError, match="--compile needs torch >= 2.0"):
        train(tiny_model(), lm_loss, sample_batch, config(compile=True), None)


def test_unknown_parallel_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="parallel strategy must be one of"):
        train(tiny_model(), lm_loss, sample_batch, config(parallel="zero3"), None)


def test_resume_logs_the_same_losses_when_intervals_do_not_divide_each_other(tmp_path):
    """Logging every 4 steps and checkpointing every 3, a run killed in step 8 resumes from the
    step-6 checkpoint in the middle of a log window (steps 5-8). The checkpoint carries the
    window's partial sums, so the line of step 8 averages steps 5-8 as the uninterrupted run's does."""
    cfg = config(log_interval=4, checkpoint_interval=3)
    train(tiny_model(dropout=0.1), lm_loss, sample_batch, cfg, tmp_path / "full", save_model=save_pretrained)

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += model.training
        if calls["n"] == 8:
            raise Crash()
        return lm_loss(model, batch)

    with pytest.raises(Crash):
        train(tiny_model(dropout=0.1), crashing_loss, sample_batch, cfg, tmp_path / "resumed", save_model=save_pretrained)
    train(tiny_model(seed=123, dropout=0.1), lm_loss, sample_batch, cfg, tmp_path / "resumed",
          save_model=save_pretrained, resume=True)
    assert [s for s, _ in losses(tmp_path / "full")] == [4, 8, 12]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_negative_checkpoint_interval_is_a_clear_error():
    with pytest.raises(ValueError, match=r"checkpoint_interval must be >= 0 \(0: only at the end\), got -1"):
        train(tiny_model(), lm_loss, sample_batch, config(checkpoint_interval=-1), None)


def nan_at_step(n):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += model.training
        loss, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == n else loss), m
    return loss_fn


def test_nan_error_says_no_checkpoint_exists_when_none_was_saved(tmp_path):
    with pytest.raises(FloatingPointError, match="step 3; .*no checkpoint was saved yet") as failed:
        train(tiny_model(), nan_at_step(3), sample_batch, config(log_interval=4, max_steps=8), tmp_path,
              save_model=save_pretrained)
    assert "previous checkpoint" not in str(failed.value)
    assert not (tmp_path / checkpointing.STATE_FILE).exists()


def test_nan_error_names_the_last_checkpoint_which_predates_the_nan(tmp_path):
    """Checkpoints every step but a log line every 4: the NaN of step 3 is caught before step 3's
    checkpoint is written, so the checkpoint the message names (step 2) has finite parameters."""
    with pytest.raises(FloatingPointError, match=r"step 3; .*the last checkpoint, of step 2, in "):
        train(tiny_model(), nan_at_step(3), sample_batch, config(log_interval=4, checkpoint_interval=1, max_steps=8),
              tmp_path, save_model=save_pretrained)
    assert torch.load(tmp_path / checkpointing.STATE_FILE, weights_only=True)["step"] == 2
    assert all(torch.isfinite(p).all() for p in from_pretrained(tmp_path).parameters())


def test_loss_plot_of_an_early_checkpoint_warns_nothing(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" would fail here
        plot_losses([], tmp_path / "empty.png")
        plot_losses([{"step": 1, "loss": 2.0}], tmp_path / "one.png")
    assert (tmp_path / "empty.png").is_file() and (tmp_path / "one.png").is_file()


class FakeTerminal:
    """stderr as a terminal: the loop then draws a progress bar."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_validation_losses_are_printed_above_the_progress_bar_in_a_terminal(monkeypatch, capsys):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(tiny_model(), lm_loss, sample_batch, config(max_steps=4, eval_interval=2), None, loss_label="train loss (x)")
    printed = capsys.readouterr().out
    assert "step 2/4: train loss (x) " in printed and "step 4/4: train loss (x) " in printed and "val loss" in printed
    assert "4/4" in terminal.text  # the bar itself went to the terminal


def test_run_that_fails_before_its_first_checkpoint_leaves_nothing_to_resume(tmp_path):
    def broken(model, batch):
        raise Crash()

    with pytest.raises(Crash):
        train(tiny_model(), broken, sample_batch, config(), tmp_path, save_model=save_pretrained)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(tiny_model(), lm_loss, sample_batch, config(), tmp_path, save_model=save_pretrained, resume=True)
    train(tiny_model(), lm_loss, sample_batch, config(max_steps=1), tmp_path, save_model=save_pretrained)
    assert [step for step, _ in losses(tmp_path)] == [1]  # the new run's own metrics only

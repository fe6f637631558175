"""Ctrl-C during training (training/interrupt.py): the first one stops the run after the step in
progress with a checkpoint that resumes exactly; a second one stops at once; the command ends
with one line and exit status 130, and no traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from architectures.common.loss import lm_loss
from architectures.llama3 import save_pretrained
from architectures.utils.command_line import Interrupted, command_line
from training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, sample_batch, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def losses(out):
    return [(e["step"], e["loss"]) for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in e]


def ctrl_c_at_step(n):
    """A batch sampler that presses Ctrl-C (SIGINT to this process) while step n is being sampled."""
    def sample(split, size, generator):
        if split == "train":
            sample.calls += 1
            if sample.calls == n:
                os.kill(os.getpid(), signal.SIGINT)
        return sample_batch(split, size, generator)
    sample.calls = 0
    return sample


def test_first_ctrl_c_saves_a_checkpoint_that_resumes_the_uninterrupted_run_exactly(tmp_path, capsys):
    cfg = config()  # checkpoint_interval 0: without the Ctrl-C handling nothing would be saved before the end
    train(tiny_model(dropout=0.1), lm_loss, sample_batch, cfg, tmp_path / "full", save_model=save_pretrained)
    with pytest.raises(Interrupted, match=r"Ctrl-C after step 5 of 12; the checkpoint in .* --resume"):
        train(tiny_model(dropout=0.1), lm_loss, ctrl_c_at_step(5), cfg, tmp_path / "cut", save_model=save_pretrained)
    assert "stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    train(tiny_model(seed=7, dropout=0.1), lm_loss, sample_batch, cfg, tmp_path / "cut", save_model=save_pretrained,
          resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_a_run_without_checkpoints_says_nothing_was_saved(tmp_path):
    with pytest.raises(Interrupted, match="writes no checkpoint, so nothing was saved"):
        train(tiny_model(), lm_loss, ctrl_c_at_step(2), config(), None)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    def twice(model, batch):
        if model.training:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks; the second, in the same step, raises
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), twice, sample_batch, config(), tmp_path, save_model=save_pretrained)
    assert not (tmp_path / "model.safetensors").exists()


def test_the_command_line_reports_an_interruption_in_one_line_with_status_130(capsys):
    @command_line
    def main(argv=None):
        raise Interrupted("Ctrl-C after step 3 of 9; the checkpoint in runs/x resumes exactly")

    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "stopped: Ctrl-C after step 3 of 9; the checkpoint in runs/x resumes exactly\n"


def test_ctrl_c_in_a_train_script_leaves_a_checkpoint_and_one_line(tmp_path):
    """The real command, as a user runs it: SIGINT arrives from outside while it trains."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "architectures.llama3.train", "--dataset", str(corpus), "--tokenizer", "char",
            "--out", str(out), "--device", "cpu", "--max-steps", "100000", "--batch-size", "2", "--block-size", "16",
            "--hidden-size", "16", "--intermediate-size", "32", "--num-hidden-layers", "1",
            "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "8", "--log-interval", "1",
            "--eval-interval", "100000"]
    env = {**os.environ, "ZOO_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):  # wait until it has trained a step
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: Ctrl-C after step ") and "--resume" in last
    assert (out / "model.safetensors").is_file() and (out / "trainer_state.pt").is_file()


def test_a_warm_up_longer_than_the_run_and_fsdp_in_one_process_are_noted(capsys, tmp_path):
    """Valid settings that are probably not what the user meant get one `note:` line each, before any work."""
    from training.cli import parse
    from training.recipes import pretraining_recipes

    parse(["--warmup-steps", "1000", "--max-steps", "2", "--parallel", "fsdp", "--out", str(tmp_path / "run")],
          pretraining_recipes("llama3"), "llama3")
    notes = capsys.readouterr().err.splitlines()
    assert notes[0].startswith("note: the warm-up (1000 steps) is longer than the run (2 steps)")
    assert notes[1].startswith("note: --parallel fsdp shards the model over the processes torchrun starts")
    parse(["--max-steps", "2", "--out", str(tmp_path / "run")], pretraining_recipes("llama3"), "llama3")
    assert capsys.readouterr().err == ""  # the preset's own warm-up cut short by a quick --max-steps: no note

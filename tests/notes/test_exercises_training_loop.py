"""The answers to the exercises of notes/training-loop.md, computed from the code and compared with the
hints the note gives."""

from pathlib import Path

import pytest

from architectures.llama3 import preset
from architectures.llama3.flops import count_parameters, flops_per_token
from training.metrics import PEAK_BF16_FLOPS
from training.optimizer import lr_at
from training.train_config import TrainConfig

NOTE = Path(__file__).resolve().parents[2] / "notes" / "training-loop.md"


def test_learning_rates_of_the_exercise(hints):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1000)
    assert [lr_at(s, cfg) for s in (49, 550, 1000)] == pytest.approx([5e-4, 5.5e-4, 1e-4])
    assert "5e-4 (warm-up counts steps from 1), 5.5e-4 (half way down the cosine), 1e-4" in hints("training-loop")


def test_mfu_of_the_table_row(hints):
    per_token = flops_per_token(preset("gpt2-124m"), 1024)
    assert per_token == 798_087_168
    mfu = 497_354 * per_token / PEAK_BF16_FLOPS["H100"]
    assert f"{mfu:.1%}" == "40.1%"
    assert "| `--batch-size 64` | H100 80GB HBM3 | 497,354 |" in NOTE.read_text()
    assert "497,354 x 798,087,168 / 989e12 = 40.1%" in hints("training-loop")


def test_fsdp_state_per_gpu(hints):
    params = count_parameters(preset("gpt2-124m"))
    assert params == 123_587_328
    assert f"{params * (4 + 8) / 2 / 2**30:.2f} GiB" == "0.69 GiB"  # fp32 weights + two fp32 AdamW moments, halved
    assert "123,587,328 x (4 + 8) / 2 bytes = 0.69 GiB" in hints("training-loop")

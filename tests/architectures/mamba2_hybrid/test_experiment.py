"""The Tiny Shakespeare experiment of architectures/mamba2_hybrid/experiments/equal_time.py: its three models weigh
the same, each run keeps the schedule's shape at its own step count, and the script runs end to end."""

import json

import pytest
import torch

from architectures.mamba2_hybrid.experiments.common import PARAMETER_TOLERANCE, build_model, parameter_spread, with_steps
from architectures.mamba2_hybrid.experiments.equal_time import KINDS, BestWeights, main, model_configs
from training.optimizer import lr_at
from training.train_config import TrainConfig


@pytest.mark.parametrize("size,vocab_size", [("cpu", 512), ("gpu", 2048)])
def test_the_three_models_have_equal_parameters_within_the_tolerance(size, vocab_size):
    configs = model_configs(size, vocab_size)
    with torch.device("meta"):
        counts = {kind: build_model(cfg).num_parameters() for kind, cfg in configs.items()}
    assert tuple(counts) == KINDS
    assert parameter_spread(counts) <= PARAMETER_TOLERANCE, counts
    assert set(configs["mamba2"].hybrid_override_pattern) == {"M"}
    assert "*" in configs["hybrid"].hybrid_override_pattern and "M" in configs["hybrid"].hybrid_override_pattern
    assert all(cfg.dropout == 0.0 for cfg in configs.values())


def test_every_run_has_the_same_schedule_shape_at_its_own_length():
    base = TrainConfig(lr=1e-3, min_lr=1e-4)
    for steps in (37, 400):
        cfg = with_steps(base, steps, evals=5)
        assert cfg.max_steps == steps and cfg.warmup_steps == max(1, steps // 10)
        assert lr_at(cfg.warmup_steps - 1, cfg) == pytest.approx(1e-3)  # the peak at the end of warm-up
        assert lr_at(steps, cfg) == pytest.approx(1e-4)  # min_lr at the run's own last step
    with pytest.raises(ValueError, match="at least one step"):
        with_steps(base, 0, evals=5)


def test_best_weights_keep_a_copy_from_the_best_evaluation():
    model = torch.nn.Linear(2, 2)
    best = BestWeights(model)
    for step, nats in ((10, 2.0), (20, 1.5), (30, 1.7)):
        with torch.no_grad():
            model.weight.fill_(step)
        best.see({"step": step, "loss": 0.1})  # a training entry: no validation, ignored
        best.see({"step": step, "val_nats_per_char": nats})
    assert best.step == 20 and best.nats == 1.5
    assert (best.state["weight"] == 20).all() and (model.weight == 30).all()



def test_script_trains_the_three_models_for_one_budget_and_writes_results(corpus, tmp_path, one_thread):
    out = tmp_path / "shakespeare"
    figure = tmp_path / "figure.png"
    results = main(["--out", str(out), "--dataset", str(corpus), "--budget-s", "1.5", "--batch-size", "4",
                    "--block-size", "32",
                    "--figure", str(figure)])
    saved = json.loads((out / "results.json").read_text())
    assert figure.is_file() and (out / "val_loss.png").is_file()
    assert tuple(saved["models"]) == KINDS and saved["budget_s"] == 1.5
    for kind, r in saved["models"].items():
        assert r["steps"] == max(1, int(1.5 / r["step_s_interleaved"]))
        assert r["val_nats_per_char"] > 0 and (out / kind / "metrics.jsonl").is_file()
        assert 1 <= r["best"]["step"] <= r["steps"] and r["best"]["val_nats_per_char"] > 0
    assert saved["parameter_spread"] == results["parameter_spread"]

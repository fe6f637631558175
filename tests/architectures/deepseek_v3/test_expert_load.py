"""The expert-load experiment (architectures/deepseek_v3/experiments/expert_load.py) end to end, for a few
steps on the small test corpus: three runs, results.json with every field the note reads, the
figure, and a second call that reuses the finished runs instead of training them again."""

import json
import math

import pytest
import torch

from architectures.deepseek_v3.experiments.expert_load import RUNS, main


@pytest.fixture
def one_thread():
    """Batches of 4 x 128 tokens gain nothing from a second thread, and two threads slow down
    badly when another job holds one of the cores (each op waits for the descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_three_runs_write_results_and_the_figure_and_are_not_run_twice(corpus, tmp_path, capsys, one_thread):
    out = tmp_path / "expert-load"
    main(["--out", str(out), "--max-steps", "3", "--batch-size", "4", "--dataset", str(corpus)])
    results = json.loads((out / "results.json").read_text())
    assert (out / "expert_load.png").is_file() and "figure" not in results  # no --figure: notes/ untouched
    assert results["size"] == "cpu" and results["preset"] == "tiny" and results["train"]["max_steps"] == 3
    assert results["train"]["batch_size"] == 4
    assert list(results["runs"]) == list(RUNS)
    for name, run in results["runs"].items():
        assert math.isfinite(run["val_nats_per_char"]) and run["val_nats_per_char"] > 0
        assert list(run["max_load"]) == ["layer1", "layer2", "layer3"]  # layer 0 is dense
        for layer in run["max_load"].values():
            assert layer["steps"] == [3] and 1.0 <= layer["final"] <= 4.0  # top-2 of 8: at most 4x the mean
        assert run["seq_aux_loss_alpha"] == (results["alpha"] if name == "balance_loss" else 0.0)
        moved = any(lo != 0 or hi != 0 for lo, hi in run["final_bias_range"])
        assert moved == (name == "bias"), "only the bias run moves the routing biases"
    metrics = [json.loads(line) for line in (out / "balance_loss" / "metrics.jsonl").read_text().splitlines()]
    assert "seq_balance_loss" in metrics[0] and "seq_balance_loss" not in metrics[1]  # training only
    capsys.readouterr()
    main(["--out", str(out), "--max-steps", "3", "--batch-size", "4", "--dataset", str(corpus)])
    assert capsys.readouterr().out.count("already done") == 3

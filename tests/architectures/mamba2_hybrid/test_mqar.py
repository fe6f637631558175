"""The MQAR task of architectures/mamba2_hybrid/experiments/mqar.py: the generator lays sequences out as Zoology
defines them, the loss counts the answers only, the three models weigh the same, and the script
runs end to end."""

import json

import pytest
import torch

from architectures.mamba2_hybrid.experiments.common import PARAMETER_TOLERANCE, build_model, parameter_spread
from architectures.mamba2_hybrid.experiments.mqar import (IGNORE_INDEX, PAD, SIZES, main, model_configs, mqar_batch,
                                              mqar_examples, mqar_loss, token_ranges)

T, V = 64, 128


@pytest.mark.parametrize("num_pairs", [1, 4, 16, 20, 31])
def test_queried_keys_were_listed_before_and_answers_are_their_values(num_pairs):
    for x, y in zip(*mqar_examples(20, num_pairs, T, V, torch.Generator().manual_seed(num_pairs))):
        keys, values = x[0:2 * num_pairs:2].tolist(), x[1:2 * num_pairs:2].tolist()
        listed = dict(zip(keys, values))
        answers = (y != IGNORE_INDEX).nonzero()[:, 0].tolist()
        assert answers, "every sequence has at least one query"
        for t in answers:
            assert t >= 2 * num_pairs, "queries come after the whole list of pairs"
            assert x[t].item() in listed and y[t].item() == listed[x[t].item()]
            if t + 1 < T:
                assert x[t + 1] == y[t], "the answer is the next input token (teacher forcing)"


@pytest.mark.parametrize("num_pairs", [1, 4, 16, 20, 31])
def test_keys_and_values_are_unique_and_come_from_disjoint_ranges(num_pairs):
    keys_range, values_range = token_ranges(V)
    assert not set(keys_range) & set(values_range) and PAD not in keys_range and PAD not in values_range
    for x in mqar_examples(20, num_pairs, T, V, torch.Generator().manual_seed(100 + num_pairs))[0]:
        keys, values = x[0:2 * num_pairs:2].tolist(), x[1:2 * num_pairs:2].tolist()
        assert len(set(keys)) == len(set(values)) == num_pairs
        assert all(k in keys_range for k in keys) and all(v in values_range for v in values)


@pytest.mark.parametrize("num_pairs", [1, 4, 16, 20, 31])
def test_answer_positions_follow_the_list_and_the_rest_is_padding(num_pairs):
    n_queries = min(num_pairs, (T - 2 * num_pairs) // 2)  # every key when 4N <= T, else as many as fit
    for x, y in zip(*mqar_examples(20, num_pairs, T, V, torch.Generator().manual_seed(7))):
        answers = (y != IGNORE_INDEX).nonzero()[:, 0]
        assert answers.tolist() == [2 * num_pairs + 2 * j for j in range(n_queries)]
        queried = x[answers].tolist()
        assert len(set(queried)) == n_queries, "no key is asked twice"
        assert (x[2 * num_pairs + 2 * n_queries:] == PAD).all()


def test_batches_are_a_function_of_the_generator_and_mix_the_pair_counts():
    a = mqar_batch(32, (2, 4, 8), T, V, torch.Generator().manual_seed(3))
    b = mqar_batch(32, (2, 4, 8), T, V, torch.Generator().manual_seed(3))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    x, y = a
    assert x.shape == y.shape == (32, T)
    answers_per_row = (y != IGNORE_INDEX).sum(1)
    assert set(answers_per_row.tolist()) == {2, 4, 8}  # 4N <= T: each row queries all of its N keys


def test_impossible_sequences_are_refused_with_the_fix():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="distinct keys"):
        mqar_examples(1, 64, 512, V, g)  # 63 key tokens in a vocabulary of 128
    with pytest.raises(ValueError, match="seq_len >= 66"):
        mqar_examples(1, 32, T, V, g)


class Oracle(torch.nn.Module):
    """Logits that are right at every answer and, elsewhere, whatever `noise` says."""

    def __init__(self, y, noise):
        super().__init__()
        self.y, self.noise = y, noise

    def forward(self, x):
        logits = self.noise.clone()
        answer = self.y != IGNORE_INDEX
        logits[answer] = -30.0
        logits[answer, self.y[answer]] = 30.0
        return logits


def test_loss_and_accuracy_count_the_answer_positions_only():
    x, y = mqar_batch(4, (4, 8), T, V, torch.Generator().manual_seed(1))
    a = Oracle(y, torch.randn(4, T, V, generator=torch.Generator().manual_seed(2)))
    b = Oracle(y, torch.randn(4, T, V, generator=torch.Generator().manual_seed(3)))
    (loss_a, m_a), (loss_b, m_b) = mqar_loss(a, (x, y)), mqar_loss(b, (x, y))
    assert loss_a.item() < 1e-10 and loss_a == loss_b  # the non-answer positions do not count
    assert m_a["accuracy"] == m_b["accuracy"] == 1.0
    noise = torch.randn(4, T, V, generator=torch.Generator().manual_seed(4))
    loss, metrics = mqar_loss(lambda x: noise, (x, y))  # no model: random logits everywhere
    assert loss.item() > 1.0 and metrics["accuracy"] < 0.5


@pytest.mark.parametrize("size", sorted(SIZES))
def test_the_three_models_have_equal_parameters_within_the_tolerance(size):
    with torch.device("meta"):
        counts = {kind: build_model(cfg).num_parameters() for kind, cfg in model_configs(size).items()}
    assert set(counts) == {"attention", "mamba2", "hybrid"}
    assert parameter_spread(counts) <= PARAMETER_TOLERANCE, counts
    configs = model_configs(size)
    assert set(configs["mamba2"].hybrid_override_pattern) == {"M"}
    assert configs["hybrid"].hybrid_override_pattern.count("*") == 1



def test_script_trains_the_three_models_and_writes_results(tmp_path, one_thread):
    out = tmp_path / "mqar"
    figure = tmp_path / "figure.png"
    results = main(["--out", str(out), "--max-steps", "3", "--batch-size", "4", "--test-rows", "8", "--budget-s", "3600",
                    "--figure", str(figure)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 3 and figure.is_file() and (out / "mqar.png").is_file()
    assert set(saved["models"]) == {"attention", "mamba2", "hybrid"}
    for r in saved["models"].values():
        assert set(r["accuracy"]) == {str(n) for n in SIZES["cpu"]["pairs"]}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["step_s_interleaved"] > 0
    assert saved["parameter_spread"] == results["parameter_spread"] <= PARAMETER_TOLERANCE

"""The reward model (training/reward/): the Bradley-Terry loss against the formula written pair by
pair, the scalar head and its normalisation, saving and loading with the marker, and
`python -m training.reward.train` end to end on a tiny base."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.reward import ScalarModel, bradley_terry_loss, load_scalar_model, save_scalar_model
from training.reward.data import collate_sides, ranked_pairs
from training.reward.model import HEAD_MARKER


def test_bradley_terry_loss_is_the_mean_negative_log_likelihood_of_the_labels():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(7, generator=g), torch.randn(7, generator=g)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    want = sum(-math.log(1 / (1 + math.exp(-(float(c) - float(r))))) for c, r in zip(chosen, rejected)) / 7
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(sum(float(c) > float(r) for c, r in zip(chosen, rejected)) / 7)
    shifted, _ = bradley_terry_loss(chosen + 5, rejected + 5)  # only differences count
    assert float(shifted) == pytest.approx(float(loss), abs=1e-6)
    with pytest.raises(ValueError, match="one per pair"):
        bradley_terry_loss(chosen, rejected[:3])


def test_the_head_reads_the_last_token_and_normalises(chat_base):
    from architectures import registry

    model = ScalarModel(registry.from_pretrained(chat_base)).eval()
    ids = torch.randint(0, 50, (3, 6))
    every = model(ids)
    assert every.shape == (3, 6)
    last = torch.tensor([5, 2, 4])
    torch.testing.assert_close(model.score(ids, last), every[torch.arange(3), last])
    # Causal: a row's score at its last token does not see the padding after it.
    padded = ids.clone()
    padded[1, 3:] = 0
    torch.testing.assert_close(model.score(padded, last)[1], model.score(ids, last)[1])
    model.normalise(every.flatten())
    scores = model(ids).flatten().detach()
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4) and float(scores.std()) == pytest.approx(1.0, abs=1e-4)


def test_saved_and_loaded_it_scores_the_same_and_a_plain_checkpoint_is_refused(chat_base, tmp_path):
    from architectures import registry

    torch.manual_seed(1)
    model = ScalarModel(registry.from_pretrained(chat_base)).eval()
    save_scalar_model(model, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / HEAD_MARKER).read_text())["format"] == "llm-zoo scalar head"
    loaded = load_scalar_model(tmp_path / "rm").eval()
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(loaded(ids), model(ids))
    with pytest.raises(FileNotFoundError, match="holds no reward head"):
        load_scalar_model(chat_base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scalar_model(tmp_path / "nowhere")


class FixedReplies:
    """Stands in for sampling: the replies `replies` would return."""

    def __init__(self, replies):
        self.replies = replies

    def __call__(self, model, fmt, prompts, max_new_tokens, temperature=0.0, seed=0, batch_size=64):
        return [self.replies[i % len(self.replies)] for i in range(len(prompts))]


def test_ranked_pairs_put_the_higher_checker_score_first(monkeypatch):
    from training import tasks

    monkeypatch.setattr(tasks, "replies", FixedReplies(["41", "42", "banana"]))
    examples = [tasks.Example("arithmetic", ({"role": "user", "content": "What is 40 + 2?"},), "42")]
    pairs = ranked_pairs(None, None, examples, samples=3, pairs_per_question=10)
    # Candidates 41 (0.1), 42 (1.1), banana (0): every two with different scores, best first.
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("41", "banana"), ("42", "41"), ("42", "banana")]
    assert len(ranked_pairs(None, None, examples, samples=3, pairs_per_question=1)) == 1


def test_collate_sides_marks_each_replys_last_token():
    batch = collate_sides([([1, 2, 3], [1, 2]), ([4, 5], [6, 7, 8, 9])], pad_id=0)
    assert batch["chosen_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert batch["chosen_last"].tolist() == [2, 1] and batch["rejected_last"].tolist() == [1, 3]


TINY = ["--max-steps", "2", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1", "--log-interval", "1",
        "--train-questions", "8", "--test-questions", "4", "--samples", "2"]


@pytest.mark.slow
def test_reward_train_writes_a_reward_model_that_loads(chat_base, tmp_path, monkeypatch):
    from training.reward.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "rm"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--out", str(out)] + TINY)
    assert set(summary["accuracy_after"]) == {"ranked", "dpo"}
    assert all(0.0 <= a <= 1.0 for a in summary["accuracy_after"].values())
    model = load_scalar_model(out)
    assert model(torch.randint(0, 50, (1, 4))).shape == (1, 4)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"accuracy"' in line]
    assert logged and {"accuracy", "margin"} <= set(logged[0])


def test_a_zero_sample_count_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.reward.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o")] + TINY + ["--samples", "0"])
    assert "--samples must be an integer >= 1" in line


def test_pairs_from_a_folder_without_a_checkpoint_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.reward.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o"), "--pairs-from",
                                str(tmp_path)] + TINY)
    assert "--pairs-from" in line and "has no config.json" in line

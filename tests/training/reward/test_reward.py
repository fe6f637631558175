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


def test_collate_sides_marks_each_replys_first_and_last_token():
    batch = collate_sides([([1, 2, 3], [1, 2], 1), ([4, 5], [6, 7, 8, 9], 1)], pad_id=0)
    assert batch["chosen_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert batch["chosen_last"].tolist() == [2, 1] and batch["rejected_last"].tolist() == [1, 3]
    assert batch["chosen_first"].tolist() == [1, 1] == batch["rejected_first"].tolist()


def test_encode_pair_sides_puts_first_at_the_replys_first_token(chat_base):
    from training.chat import chat_format
    from training.dpo.data import Pair
    from training.reward.data import encode_pair_sides
    from training.tokenizer import Tokenizer

    fmt = chat_format(Tokenizer.from_file(chat_base))
    prompt = ({"role": "user", "content": "What is 40 + 2?"},)
    [(chosen, rejected, first)] = encode_pair_sides([Pair(prompt, "42", "7")], fmt, 64)
    assert chosen[:first] == rejected[:first] == fmt.prompt(list(prompt))
    assert chosen[first:] == fmt.render(Pair(prompt, "42", "7").conversations()[0], "x")[0][first:] != rejected[first:]


def test_the_likelihood_term_is_the_trunks_log_likelihood_of_the_reply(chat_base, tmp_path):
    from architectures import registry

    torch.manual_seed(2)
    model = ScalarModel(registry.from_pretrained(chat_base), likelihood=True).eval()
    assert float(model.likelihood_weight.detach()) == 0.0  # starts as the plain head
    with torch.no_grad():
        model.likelihood_weight.fill_(0.7)
    ids = torch.randint(0, 50, (3, 7))
    first, last = torch.tensor([2, 4, 1]), torch.tensor([5, 4, 6])
    slow = []  # the reply's log-likelihood, one prefix and one token at a time
    for b in range(3):
        total = 0.0
        for t in range(int(first[b]), int(last[b]) + 1):
            total += float(torch.log_softmax(model.trunk(ids[b:b + 1, :t])[0, -1].float(), -1)[ids[b, t]])
        slow.append(total)
    head = model(ids)[torch.arange(3), last]
    torch.testing.assert_close(model.score(ids, last, first), head + 0.7 * torch.tensor(slow), atol=1e-4, rtol=1e-5)
    padded = ids.clone()
    padded[0, 6:] = 0  # after row 0's last token: unseen
    torch.testing.assert_close(model.score(padded, last, first)[0], model.score(ids, last, first)[0])
    with pytest.raises(ValueError, match="needs first"):
        model.score(ids, last)
    with torch.no_grad():
        model.normalise(model.score(ids, last, first))
        scores = model.score(ids, last, first)
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4) and float(scores.std()) == pytest.approx(1.0, abs=1e-4)
    save_scalar_model(model, tmp_path / "rm")
    assert "log-likelihood" in json.loads((tmp_path / "rm" / HEAD_MARKER).read_text())["reads"]
    loaded = load_scalar_model(tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(ids, last, first), scores)


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
    assert summary["likelihood_weight"] is None


@pytest.mark.slow
def test_reward_train_with_the_likelihood_term_learns_its_weight(chat_base, tmp_path, monkeypatch):
    from training.reward.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "rm"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--out", str(out), "--likelihood"] + TINY)
    assert summary["likelihood_weight"] != 0.0  # trained away from its start
    assert float(load_scalar_model(out).likelihood_weight) == pytest.approx(summary["likelihood_weight"])


def test_a_zero_sample_count_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.reward.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o")] + TINY + ["--samples", "0"])
    assert "--samples must be an integer >= 1" in line


def test_pairs_from_a_folder_without_a_checkpoint_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.reward.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o"), "--pairs-from",
                                str(tmp_path)] + TINY)
    assert "--pairs-from" in line and "has no config.json" in line
